"""bench/plot.py: which rows a panel shows and how its bars are coloured."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.plot import bar_colors, newest_by_case  # noqa: E402


def _row(provider, date, ms, **extra):
    return {"provider": provider, "date": date, "N": 8, "ms": ms, **extra}


def test_newest_valid_row_per_provider():
    rows = [
        _row("veofast", "2026-11-29T10:00:00+00:00", 4.0),
        _row("veofast", "2026-11-30T10:00:00+00:00", 3.0),
        _row("peer", "2026-11-28T09:00:00+00:00", 3.5),
        _row("peer", "2026-11-30T09:30:00+00:00", 9.0, error="OOM"),
        _row("veofast", "2026-11-30T11:00:00+00:00", 0.0, check="rel_err_vs_fp32"),
    ]
    (case,) = newest_by_case(rows).values()
    assert {p: r["ms"] for p, r in case.items()} == {"veofast": 3.0, "peer": 3.5}


def test_reference_rows_are_grey_and_never_best():
    names = ["veofast", "peer", "bound: GEMMs alone"]
    assert bar_colors(names, [600.0, 500.0, 700.0], higher=True) == ["tab:green", "tab:blue", "tab:gray"]
    assert bar_colors(names, [6.0, 5.0, 4.0], higher=False) == ["tab:blue", "tab:green", "tab:gray"]
    assert bar_colors(["bound: only"], [1.0], higher=True) == ["tab:gray"]
