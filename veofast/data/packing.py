"""Best-fit-decreasing packing of sequence lengths into micro-batches under a token budget.

``pack_sequences(lengths, budget)`` is the one entry point; it runs the C++ packer (``veofast._C.pack_bfd``)
when the extension is built and this module's pure-Python implementation otherwise (logging once why). Both
implement the same algorithm with the same tie-breaking and return identical arrays, so the Python code is
the definition and the test oracle.

The algorithm, with every tie broken deterministically:

1. Visit the sequences by decreasing length; equal lengths by increasing index.
2. Put each into the open bin with the *least* remaining room that still fits it ("best fit"); among bins
   with that same room, the one that reached that room most recently (last in, first out). When no open bin
   fits, open a new bin; bins are numbered in the order they were opened.
3. Report the bins in that order, each bin's indices in increasing order.

Every length must lie in ``[0, budget]``: a longer sequence can never fit, and the caller decides what happens
to it (the dynamic batcher gives it a micro-batch of its own; see ``dynamic_batching.py``). The budget is at most
``MAX_BUDGET`` = 2**24 tokens. Cost: O(n log n) for the sort; the C++ placement is O(1) per sequence for budgets
up to ~2**18 tokens. The C++ call reads an int64 NumPy array in place and returns two fresh arrays; its fixed
cost (~0.6 us) is about a quarter of a call over the default buffer of 200 sequences (~2.5 us).
"""

from __future__ import annotations

import bisect
import logging

import numpy as np

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "cpp", "python")
MAX_BUDGET = 2**24  # tokens; the C++ packer keeps O(budget) scratch (veofast._C.MAX_BUDGET)

try:
    from veofast import _C

    _CPP_ERROR: str | None = None
except ImportError as exc:  # extension not built (no compiler at install time)
    _C = None
    _CPP_ERROR = str(exc)
_pack_bfd = _C.pack_bfd if _C is not None else None  # looked up once: ~10 ns a call
_warned_fallback = False


def cpp_available() -> bool:
    """Whether the C++ packer ``veofast._C`` is built and importable."""
    return _C is not None


def pack_sequences(lengths, budget: int, *, backend: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Pack sequences into bins of at most ``budget`` tokens by best-fit-decreasing (rules in the module doc).

    Args:
        lengths: (n,) integers, each in ``[0, budget]``: best an int64 NumPy array, which the C++ packer reads in
            place (no conversion, no copy); any other array-like (list, torch CPU tensor, ...) is converted first.
        budget: tokens per bin, in ``[1, MAX_BUDGET]``.
        backend: ``"auto"`` (C++ if built, else Python), ``"cpp"`` (raises if not built) or ``"python"``.

    Returns:
        ``(indices, offsets)``: int64 arrays of shapes (n,) and (bins + 1,); bin ``b`` holds the sequences
        ``indices[offsets[b]:offsets[b + 1]]``.
    """
    if _pack_bfd is not None and (backend == "auto" or backend == "cpp"):
        # The dataloader's call, an int64 array and an int, goes straight to C++, which checks everything: it
        # raises TypeError for any other type, and then the arguments are converted (or refused) here, once.
        try:
            return _pack_bfd(lengths, budget)
        except TypeError:
            pass
        lengths = _lengths_array(lengths)
        _check_budget(budget)
        return _pack_bfd(lengths, int(budget))
    if backend not in BACKENDS:
        raise ValueError(f"pack_sequences: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "cpp":
        raise ValueError(f"pack_sequences: backend='cpp' asked for but veofast._C is not built ({_CPP_ERROR})")
    if backend == "auto":
        global _warned_fallback
        if not _warned_fallback:
            _warned_fallback = True
            logger.warning("veofast._C is not built (%s); packing with the pure-Python fallback.", _CPP_ERROR)
    return pack_sequences_python(lengths, budget)


def pack_sequences_python(lengths: np.ndarray, budget: int) -> tuple[np.ndarray, np.ndarray]:
    """The pure-Python best-fit-decreasing packer; same contract as ``pack_sequences``.

    Open bins live in a sorted list of ``(room, -stamp, bin)``; ``stamp`` counts placements, so the first
    entry with ``room >= length`` is the least sufficient room, most recently reached.
    """
    array = _lengths_array(lengths)
    _check_budget(budget)
    if array.size and (array.min() < 0 or array.max() > budget):
        bad = int(np.flatnonzero((array < 0) | (array > budget))[0])
        raise ValueError(f"pack_sequences: lengths[{bad}] = {int(array[bad])} is outside [0, budget={budget}]")
    values = array.tolist()
    n = len(values)
    order = sorted(range(n), key=lambda i: (-values[i], i))
    open_bins: list[tuple[int, int, int]] = []
    rooms: list[int] = []
    bin_of = [0] * n
    for stamp, i in enumerate(order):
        length = values[i]
        pos = bisect.bisect_left(open_bins, (length, -n - 1, -1))
        if pos == len(open_bins):
            bin_id = len(rooms)
            rooms.append(budget)
        else:
            bin_id = open_bins.pop(pos)[2]
        rooms[bin_id] -= length
        bin_of[i] = bin_id
        bisect.insort(open_bins, (rooms[bin_id], -stamp, bin_id))
    counts = np.bincount(np.asarray(bin_of, dtype=np.int64), minlength=len(rooms))
    offsets = np.zeros(len(rooms) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    indices = np.argsort(np.asarray(bin_of, dtype=np.int64), kind="stable").astype(np.int64)
    return indices, offsets


def _check_budget(budget: int) -> None:
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or not 1 <= budget <= MAX_BUDGET:
        raise ValueError(f"pack_sequences: budget must be an int in [1, 2**24], got {budget!r}")


def _lengths_array(lengths) -> np.ndarray:
    """lengths as a 1-D int64 NumPy array (no copy when it already is one)."""
    array = np.asarray(lengths)
    if array.size and array.dtype.kind not in "iu":
        raise TypeError(f"pack_sequences: lengths must be integers, got dtype {array.dtype}")
    if array.ndim != 1:
        raise ValueError(f"pack_sequences: lengths must be 1-D, got shape {array.shape}")
    return array.astype(np.int64, copy=False)
