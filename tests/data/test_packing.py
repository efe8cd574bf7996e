"""The packer: C++ == Python on random inputs, the packing invariants, and input errors."""

from __future__ import annotations

import numpy as np
import pytest

from veofast.data.packing import cpp_available, pack_sequences, pack_sequences_python

needs_cpp = pytest.mark.skipif(not cpp_available(), reason="veofast._C is not built (no C++ compiler at install)")


def random_case(seed: int) -> tuple[np.ndarray, int]:
    rng = np.random.default_rng(seed)
    budget = int(rng.choice([1, 7, 64, 1000, 8192, 70_000]))
    n = int(rng.integers(0, 400))
    kind = seed % 4
    if kind == 0:
        lengths = rng.integers(0, budget + 1, n)
    elif kind == 1:  # many ties
        lengths = rng.integers(0, 4, n) * max(budget // 4, 1)
    elif kind == 2:  # log-normal, clipped to the budget
        lengths = np.clip(np.round(rng.lognormal(np.log(max(budget / 12, 1)), 1.0, n)), 1, budget)
    else:  # tiny sequences
        lengths = rng.integers(0, 3, n)
    return np.minimum(lengths, budget).astype(np.int64), budget


def check_packing(lengths: np.ndarray, budget: int, indices: np.ndarray, offsets: np.ndarray) -> None:
    assert indices.dtype == np.int64 and offsets.dtype == np.int64
    assert sorted(indices.tolist()) == list(range(len(lengths)))  # every sequence exactly once
    assert offsets[0] == 0 and offsets[-1] == len(lengths) and np.all(np.diff(offsets) >= 1)
    for b in range(len(offsets) - 1):
        members = indices[offsets[b] : offsets[b + 1]]
        assert np.all(np.diff(members) > 0)  # increasing index within a bin
        assert lengths[members].sum() <= budget


@needs_cpp
@pytest.mark.parametrize("seed", range(40))
def test_cpp_equals_python(seed):
    lengths, budget = random_case(seed)
    cpp = pack_sequences(lengths, budget, backend="cpp")
    py = pack_sequences_python(lengths, budget)
    check_packing(lengths, budget, *py)
    np.testing.assert_array_equal(cpp[0], py[0])
    np.testing.assert_array_equal(cpp[1], py[1])


@pytest.mark.parametrize("seed", range(6))
def test_python_invariants_and_best_fit(seed):
    lengths, budget = random_case(seed)
    indices, offsets = pack_sequences_python(lengths, budget)
    check_packing(lengths, budget, indices, offsets)
    fills = [int(lengths[indices[offsets[b] : offsets[b + 1]]].sum()) for b in range(len(offsets) - 1)]
    # first-fit-decreasing style bound: no two bins could be merged into one
    assert sum(f <= budget / 2 for f in fills) <= 1


def test_hand_example():
    # decreasing: 6 (bin 0, room 4), 5 (bin 1, room 5), 4 -> least room that fits: bin 0 (room 4 -> 0),
    # 3 -> bin 1 (room 5 -> 2), 2 -> bin 1 (room 2 -> 0), 1 -> new bin 2
    lengths = np.array([3, 6, 1, 5, 2, 4])
    indices, offsets = pack_sequences_python(lengths, 10)
    assert offsets.tolist() == [0, 2, 5, 6]
    assert indices.tolist() == [1, 5, 0, 3, 4, 2]
    if cpp_available():
        assert [a.tolist() for a in pack_sequences(lengths, 10, backend="cpp")] == [indices.tolist(), offsets.tolist()]


def test_tie_break_most_recent_room():
    # 4, 4 open bins 0 and 1 (room 1 each, bin 1 most recent); 1 goes to bin 1
    indices, offsets = pack_sequences_python(np.array([4, 4, 1]), 5)
    assert offsets.tolist() == [0, 1, 3] and indices.tolist() == [0, 1, 2]


@pytest.mark.parametrize("backend", ["python", pytest.param("cpp", marks=needs_cpp)])
def test_bad_inputs(backend):
    with pytest.raises(ValueError, match=r"lengths\[1\] = 11"):
        pack_sequences([3, 11], 10, backend=backend)
    with pytest.raises(ValueError, match=r"lengths\[0\] = -1"):
        pack_sequences([-1], 10, backend=backend)
    with pytest.raises(ValueError, match="budget"):
        pack_sequences([1], 0, backend=backend)
    with pytest.raises(ValueError, match="1-D"):
        pack_sequences([[1, 2]], 10, backend=backend)
    with pytest.raises(TypeError, match="integers"):
        pack_sequences([1.5], 10, backend=backend)
    indices, offsets = pack_sequences(np.zeros(0, dtype=np.int64), 10, backend=backend)
    assert indices.size == 0 and offsets.tolist() == [0]


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        pack_sequences([1], 10, backend="gpu")
