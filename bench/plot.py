"""Charts of the benchmark results: ``bench/results/<suite>.jsonl`` -> ``bench/results/<suite>.png``.

One PNG per suite found (cross_entropy, attention, moe, small_ops, train, and any other ``*.jsonl``), with one panel
per case (a shape / op / mode / model) and one bar per provider, so providers compare side by side. The newest row
of each (case, provider) is plotted; rows with an ``error`` or a ``check`` (correctness rows) are left out. Providers
named ``bound: ...`` are reference measurements, not providers (e.g. the loss's GEMMs alone): their bars are grey and
never the best. The
metric of a panel is the first one its rows have of: tokens/s per GPU (train), TFLOP/s, GB/s, ms (lower is better;
the panel title says so). For ``train`` a second chart, ``train_split.png``, stacks each run's time split (attention /
loss / MoE / rest, % of kernel time). Suites without a file, or with nothing plottable, are skipped with a note.

    python bench/plot.py [--results bench/results] [--suites cross_entropy,attention,moe,small_ops,train]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_SUITES = ("cross_entropy", "attention", "moe", "small_ops", "train")
# Fields that name a case (what was measured), in the order they appear in a panel title.
CASE_KEYS = (
    "model",
    "op",
    "mode",
    "shape",
    "dtype",
    "world_size",
    "N",
    "T",
    "H",
    "V",
    "ignored",
    "E",
    "I",
    "K",
    "docs",
    "tokens",
    "seq_len",
    "heads",
    "head_dim",
    "causal",
)
# (metric key, axis label, higher is better); the first one a panel's rows have is plotted.
METRICS = (
    ("tokens_per_s_per_gpu", "tokens/s per GPU", True),
    ("tflops", "TFLOP/s", True),
    ("fwd_bwd_tflops", "fwd+bwd TFLOP/s", True),
    ("fwd_tflops", "fwd TFLOP/s", True),
    ("gbps", "GB/s", True),
    ("GB/s", "GB/s", True),
    ("ms", "ms (lower is better)", False),
)
SPLIT = ("attention_pct", "loss_pct", "moe_pct", "rest_pct")
REFERENCE_PREFIX = "bound:"


def load_rows(path: Path) -> list[dict]:
    """The JSON lines of ``path``; lines that do not parse are skipped."""
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _metric(rows: list[dict]) -> tuple[str, str, bool] | None:
    for key, label, higher in METRICS:
        if any(_number(r.get(key)) is not None for r in rows):
            return key, label, higher
    for r in rows:  # a suite with its own metric names: anything that says TFLOP/s
        for key in r:
            if "tflop" in key.lower() and _number(r[key]) is not None:
                return key, key, True
    return None


def case_name(row: dict) -> str:
    return (
        ", ".join(
            f"{k}={row[k]}" if k not in ("model", "op", "mode", "shape") else str(row[k])
            for k in CASE_KEYS
            if k in row and row[k] is not None
        )
        or "all"
    )


def newest_by_case(rows: list[dict]) -> dict[str, dict[str, dict]]:
    """case -> provider -> the last (newest) valid row: files are appended in time order."""
    cases: dict[str, dict[str, dict]] = {}
    for row in rows:
        if row.get("error") or row.get("check") or "provider" not in row:
            continue
        cases.setdefault(case_name(row), {})[str(row["provider"])] = row
    return cases


def bar_colors(names: list[str], values: list[float], higher: bool) -> list[str]:
    """Green for the best provider, blue for the others, grey for reference rows (``REFERENCE_PREFIX``)."""
    compared = [v for n, v in zip(names, values) if not n.startswith(REFERENCE_PREFIX)]
    best = (max(compared) if higher else min(compared)) if compared else None
    return [
        "tab:gray" if n.startswith(REFERENCE_PREFIX) else "tab:green" if v == best else "tab:blue"
        for n, v in zip(names, values)
    ]


def plot_suite(suite: str, rows: list[dict], out: Path, *, max_panels: int = 24) -> Path | None:
    """Bar chart panels for one suite; returns the PNG path, or None when nothing is plottable."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for case, by_provider in newest_by_case(rows).items():
        metric = _metric(list(by_provider.values()))
        if metric is None:
            continue
        key = metric[0]
        bars = [(p, _number(r.get(key))) for p, r in by_provider.items() if _number(r.get(key)) is not None]
        if bars:
            panels.append((case, metric, bars))
    if not panels:
        return None
    if len(panels) > max_panels:
        print(f"note: {suite}: {len(panels)} cases, plotting the first {max_panels}")
        panels = panels[:max_panels]
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(6.0 * cols, 3.6 * nrows), squeeze=False)
    for ax, (case, (_key, label, higher), bars) in zip(axes.flat, panels):
        names = [p for p, _ in bars]
        values = [v for _, v in bars]
        ax.barh(range(len(values)), values, color=bar_colors(names, values, higher))
        ax.set_yticks(range(len(values)), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(label, fontsize=8)
        ax.set_title(case if len(case) <= 70 else case[:67] + "...", fontsize=9)
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:.3g}", va="center", fontsize=7)
        ax.margins(x=0.18)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    device = next((r.get("device") for r in rows if r.get("device")), "")
    fig.suptitle(f"{suite}{f' ({device})' if device else ''}; best bar in green", fontsize=11)
    fig.tight_layout()
    path = out / f"{suite}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_train_split(rows: list[dict], out: Path) -> Path | None:
    """Stacked bars of the time split of each (model, provider) in ``train`` rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = []
    for case, by_provider in newest_by_case(rows).items():
        for provider, row in by_provider.items():
            parts = [_number(row.get(k)) for k in SPLIT]
            if all(p is not None for p in parts):
                bars.append((f"{case} / {provider}", parts))
    if not bars:
        return None
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(bars) + 1.5))
    left = [0.0] * len(bars)
    for j, (name, color) in enumerate(zip(SPLIT, ("tab:orange", "tab:red", "tab:purple", "tab:gray"))):
        widths = [parts[j] for _, parts in bars]
        ax.barh(range(len(bars)), widths, left=left, color=color, label=name.removesuffix("_pct"))
        left = [a + b for a, b in zip(left, widths)]
    ax.set_yticks(range(len(bars)), [b[0] for b in bars], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("% of profiled CUDA kernel time")
    ax.set_xlim(0, 100)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("training step time split")
    fig.tight_layout()
    path = out / "train_split.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="folder of <suite>.jsonl files")
    parser.add_argument("--out", type=Path, default=None, help="where PNGs go (default: --results)")
    parser.add_argument("--suites", default=None, help="comma-separated; default: every *.jsonl found")
    args = parser.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        sys.exit("bench/plot.py needs matplotlib: pip install matplotlib")
    out = args.out or args.results
    out.mkdir(parents=True, exist_ok=True)
    if args.suites:
        suites = [s for s in args.suites.split(",") if s]
    else:
        found = sorted(p.stem for p in args.results.glob("*.jsonl")) if args.results.is_dir() else []
        suites = [s for s in DEFAULT_SUITES if s in found] + [s for s in found if s not in DEFAULT_SUITES]
    written = []
    for suite in suites:
        path = args.results / f"{suite}.jsonl"
        if not path.exists():
            print(f"note: {suite}: no {path}, skipped")
            continue
        rows = load_rows(path)
        try:
            png = plot_suite(suite, rows, out)
            split = plot_train_split(rows, out) if suite == "train" else None
        except Exception as exc:  # one bad suite must not stop the others
            print(f"note: {suite}: plotting failed: {type(exc).__name__}: {exc}")
            continue
        for p in (png, split):
            if p is not None:
                written.append(p)
                print(f"wrote {p}")
        if png is None:
            print(f"note: {suite}: nothing plottable in {path} ({len(rows)} rows)")
    if not written:
        print(f"note: no charts written (results in {args.results})")
    return written


if __name__ == "__main__":
    main()
