"""The packer: C++ == Python on random inputs, the packing invariants, the inputs C++ reads in place, input
errors, and how the dynamic batcher turns the packer's bins into micro-batches."""

from __future__ import annotations

import array
import itertools
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from veofast.data.dynamic_batching import DynamicBatcher
from veofast.data.packing import MAX_BUDGET, cpp_available, pack_sequences, pack_sequences_python

needs_cpp = pytest.mark.skipif(not cpp_available(), reason="veofast._C is not built (no C++ compiler at install)")


def random_case(seed: int) -> tuple[np.ndarray, int]:
    rng = np.random.default_rng(seed)
    budget = int(rng.choice([1, 7, 64, 1000, 8192, 70_000, 300_000, MAX_BUDGET]))
    n = int(rng.integers(0, 400)) if seed % 20 else int(rng.integers(9000, 12000))  # > 8192: wider radix digits
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
    starts = np.zeros(len(indices), dtype=bool)
    starts[offsets[:-1]] = True
    assert np.all((np.diff(indices) > 0) | starts[1:])  # increasing index within a bin
    if len(lengths):
        assert np.all(np.add.reduceat(lengths[indices], offsets[:-1]) <= budget)


@needs_cpp
@pytest.mark.parametrize("seed", range(60))
def test_cpp_equals_python(seed):
    lengths, budget = random_case(seed)
    cpp = pack_sequences(lengths, budget, backend="cpp")
    py = pack_sequences_python(lengths, budget)
    check_packing(lengths, budget, *py)
    np.testing.assert_array_equal(cpp[0], py[0])
    np.testing.assert_array_equal(cpp[1], py[1])


@needs_cpp
@pytest.mark.parametrize("budget", [1, 2, 4])
def test_cpp_equals_python_exhaustive_small(budget):
    # every length vector of up to 6 sequences (5 at budget 4): each order in which rooms open, tie, fall below
    # the length and come back to fit it, and zero lengths (a bin keeps its room)
    for n in range(7 if budget < 4 else 6):
        for lengths in itertools.product(range(budget + 1), repeat=n):
            lengths = np.array(lengths, dtype=np.int64)
            cpp = pack_sequences(lengths, budget, backend="cpp")
            py = pack_sequences_python(lengths, budget)
            assert cpp[0].tolist() == py[0].tolist() and cpp[1].tolist() == py[1].tolist(), lengths


@needs_cpp
@pytest.mark.parametrize("n", [0, 1, 2, 3, 57, 200, 8191, 8192])
def test_cpp_equals_python_every_radix_layout(n):
    # budgets of every bit length and both ends of it pick every split of budget - length into radix digits (of
    # at most 8 bits below n = 8192, 11 from there); the top digit is counted in two halves (n odd and even).
    # Lengths: ties, 0 and the budget itself among uniform ones.
    rng = np.random.default_rng(n)
    for bits in range(1, 26):
        for budget in sorted({2 ** (bits - 1), min(2**bits - 1, MAX_BUDGET)}):
            lengths = rng.integers(0, budget + 1, n)
            lengths[rng.random(n) < 0.2] = budget
            lengths[rng.random(n) < 0.1] = 0
            lengths[rng.random(n) < 0.2] = budget // 3
            cpp = pack_sequences(lengths, budget, backend="cpp")
            py = pack_sequences_python(lengths, budget)
            assert cpp[0].tolist() == py[0].tolist() and cpp[1].tolist() == py[1].tolist(), (n, budget)


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
    with pytest.raises(ValueError, match="1-D"):
        pack_sequences(np.ones((2, 2), dtype=np.int64), 10, backend=backend)
    with pytest.raises(ValueError, match="budget"):
        pack_sequences(np.ones(2, dtype=np.int64), True, backend=backend)
    with pytest.raises(ValueError, match="budget"):
        pack_sequences(np.ones(2, dtype=np.int64), 10.0, backend=backend)
    with pytest.raises(TypeError, match="integers"):
        pack_sequences([1.5], 10, backend=backend)
    indices, offsets = pack_sequences(np.zeros(0, dtype=np.int64), 10, backend=backend)
    assert indices.size == 0 and offsets.tolist() == [0]


@needs_cpp
def test_cpp_reads_buffers_in_place():
    from veofast import _C

    assert _C.MAX_BUDGET == MAX_BUDGET
    rng = np.random.default_rng(0)
    wide = rng.integers(0, 50, (97, 3)).astype(np.int64)
    expected = pack_sequences_python(np.ascontiguousarray(wide[:, 1]), 60)
    for lengths in (wide[:, 1], array.array("q", wide[:, 1].tolist()), memoryview(np.ascontiguousarray(wide[:, 1]))):
        got = _C.pack_bfd(lengths, 60)  # a strided column, array.array, memoryview: no conversion
        np.testing.assert_array_equal(got[0], expected[0])
        np.testing.assert_array_equal(got[1], expected[1])
    for lengths in (torch.from_numpy(wide[:, 1].copy()), wide[:, 1].astype(np.int32), wide[:, 1].tolist()):
        got = pack_sequences(lengths, 60, backend="cpp")  # converted once by the wrapper
        np.testing.assert_array_equal(got[0], expected[0])
    # anything C++ does not read in place is a TypeError, which pack_sequences answers by converting
    with pytest.raises(TypeError, match="int64"):
        _C.pack_bfd(wide[:, 1].astype(np.int32), 60)
    with pytest.raises(TypeError, match="int64"):
        _C.pack_bfd(np.ascontiguousarray(wide[:2]), 60)
    with pytest.raises(TypeError, match="buffer"):
        _C.pack_bfd([1, 2], 60)
    for budget in (np.int64(60), True, 60.0):
        with pytest.raises(TypeError, match="budget"):
            _C.pack_bfd(wide[:, 1], budget)
    for budget in (0, MAX_BUDGET + 1, 2**80):
        with pytest.raises(ValueError, match="budget"):
            _C.pack_bfd(wide[:, 1], budget)
    got = pack_sequences(wide[:, 1], np.int64(60), backend="cpp")
    np.testing.assert_array_equal(got[0], expected[0])


@needs_cpp
@pytest.mark.parametrize("n", [5, 5000])  # 5000: the GIL is released, the error raised after
def test_cpp_range_errors_leave_the_scratch_clean(n):
    # the sort checks the range as it counts: a refused call must leave its reused counters as it found them
    rng = np.random.default_rng(n)
    for budget in (1000, 70_000):
        lengths = rng.integers(0, budget + 1, n)
        for bad in (-1, budget + 1, -(2**63)):
            wrong = lengths.copy()
            wrong[n - 2] = bad
            with pytest.raises(ValueError, match=rf"lengths\[{n - 2}\] = {bad} is outside"):
                pack_sequences(wrong, budget, backend="cpp")
            cpp = pack_sequences(lengths, budget, backend="cpp")
            py = pack_sequences_python(lengths, budget)
            assert cpp[0].tolist() == py[0].tolist() and cpp[1].tolist() == py[1].tolist()


@needs_cpp
def test_cpp_threads():
    # from 4096 sequences the C++ packer releases the GIL; each thread has its own scratch space
    cases = [random_case(20 * k) for k in range(4)] * 2
    expected = [pack_sequences(lengths, budget, backend="cpp") for lengths, budget in cases]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda case: pack_sequences(*case, backend="cpp"), cases))
    for (indices, offsets), (want_indices, want_offsets) in zip(got, expected):
        np.testing.assert_array_equal(indices, want_indices)
        np.testing.assert_array_equal(offsets, want_offsets)


@needs_cpp
def test_cpp_empty_lengths_on_a_fresh_thread():
    # a thread's scratch starts without key storage: the first call there must not take it for a range error
    with ThreadPoolExecutor(1) as pool:
        indices, offsets = pool.submit(pack_sequences, np.zeros(0, dtype=np.int64), 8192, backend="cpp").result()
    assert indices.size == 0 and offsets.tolist() == [0]


@pytest.mark.parametrize("backend", ["python", pytest.param("cpp", marks=needs_cpp)])
def test_dynamic_batcher_ships_all_bins_but_the_emptiest(backend):
    lengths = [3, 6, 1, 5, 2, 4, 9, 9, 9, 9, 9]
    samples = [
        {"id": i, "input_ids": np.zeros(n, np.int64), "labels": np.zeros(n, np.int64)} for i, n in enumerate(lengths)
    ]
    stream = iter(samples)
    batcher = DynamicBatcher(stream, budget_at=lambda _: 10, max_tokens=10, buffer_size=6, backend=backend)
    got = [[s["id"] for s in batcher.next_micro_batch()] for _ in range(6)]
    # buffer 0..5 packs as [1, 5] [0, 3, 4] [2] (the hand example): [2] holds 1 token and waits. Buffer 2, 6..10:
    # the 9s open bins 6..10, the 1 (2) joins the most recent room-1 bin (10); the emptiest, last opened on a
    # tie, is [9], which waits.
    assert got == [[1, 5], [0, 3, 4], [6], [7], [8], [2, 10]]
    assert [s["id"] for s in batcher.buffer] == [9]


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        pack_sequences([1], 10, backend="gpu")
