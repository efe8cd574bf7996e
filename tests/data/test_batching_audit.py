"""Audit of batching: the packer without its extension and across budgets, the dynamic batcher's sample accounting,
collator invariants on random documents, data-parallel sharding, and the loader's resume state and stream errors."""

from __future__ import annotations

import importlib
import io
import itertools
import logging
import sys
from functools import partial

import numpy as np
import pytest
import torch
from conftest import write_jsonl

import veofast
import veofast.data.data_loader as data_loader
import veofast.data.packing as packing
from veofast.data import build_dataloader, build_iterative_dataset
from veofast.data.data_collator import (
    IGNORE_INDEX,
    DataCollatorWithPacking,
    DataCollatorWithPadding,
    DataCollatorWithPositionIDs,
)
from veofast.data.data_transform import process_pretrain_example
from veofast.data.dynamic_batching import DynamicBatcher
from veofast.data.packing import MAX_BUDGET, cpp_available, pack_sequences, pack_sequences_python

needs_cpp = pytest.mark.skipif(not cpp_available(), reason="veofast._C is not built (no C++ compiler at install)")


# ------------------------------------------------------------------------------------------------------- the packer
@needs_cpp
def test_cpp_scratch_is_reused_across_budgets_and_refusals():
    """One thread's reused scratch (room stacks and bitset sized for the largest budget so far, radix counters) must
    serve smaller and larger budgets alike, also after a refused call and on reversed (negative-stride) views."""
    rng = np.random.default_rng(5)
    for budget in (MAX_BUDGET, 3, 70_000, 1, 2**16, 255, 256, MAX_BUDGET - 1, 2):
        for n in (1, 37, 300):
            lengths = rng.integers(0, budget + 1, n)
            lengths[rng.random(n) < 0.3] = budget // 2
            with pytest.raises(ValueError, match=r"lengths\[0\] = -1 is outside"):
                pack_sequences(np.concatenate([[-1], lengths]), budget, backend="cpp")
            view = lengths[::-1]
            cpp = pack_sequences(view, budget, backend="cpp")
            py = pack_sequences_python(view.copy(), budget)
            assert cpp[0].tolist() == py[0].tolist() and cpp[1].tolist() == py[1].tolist(), (budget, n)


@pytest.fixture
def packing_without_extension(monkeypatch):
    """``veofast.data.packing`` imported again as if ``veofast._C`` failed to import; restored afterwards."""
    monkeypatch.delattr(veofast, "_C", raising=False)  # `from veofast import _C` looks in sys.modules, finds None:
    monkeypatch.setitem(sys.modules, "veofast._C", None)  # ImportError
    try:
        yield importlib.reload(packing)
    finally:
        monkeypatch.undo()
        importlib.reload(packing)


def test_packing_falls_back_to_python_when_the_extension_does_not_import(
    packing_without_extension, caplog, monkeypatch
):
    """Without ``veofast._C``: ``auto`` packs in Python (same bins) and logs why once; ``cpp`` raises, saying why."""
    module = packing_without_extension
    assert not module.cpp_available()
    python_calls = []
    python_packer = module.pack_sequences_python
    monkeypatch.setattr(module, "pack_sequences_python", lambda *args: python_calls.append(1) or python_packer(*args))
    lengths = np.array([3, 6, 1, 5, 2, 4])
    with caplog.at_level(logging.WARNING, logger="veofast.data.packing"):
        got = [module.pack_sequences(lengths, 10) for _ in range(2)]
        batcher = DynamicBatcher(iter(_samples(lengths)), budget_at=lambda _: 10, max_tokens=10, buffer_size=6)
        first = [s["id"] for s in batcher.next_micro_batch()]  # the batcher's own import of pack_sequences
    (record,) = caplog.records  # logged once, with the import error
    assert record.getMessage().startswith("veofast._C is not built (import of veofast._C halted")
    assert record.getMessage().endswith("packing with the pure-Python fallback.")
    for indices, offsets in got:
        assert indices.tolist() == [1, 5, 0, 3, 4, 2] and offsets.tolist() == [0, 2, 5, 6]
    assert first == [1, 5] and len(python_calls) == 3
    with pytest.raises(ValueError, match=r"backend='cpp' asked for but veofast._C is not built \(import of"):
        module.pack_sequences(lengths, 10, backend="cpp")


# ---------------------------------------------------------------------------------------------- the dynamic batcher
def _samples(lengths) -> list[dict]:
    """Samples numbered by ``id``, each training every token."""
    return [{"id": i, "input_ids": np.full(n, i, np.int64), "labels": np.arange(n)} for i, n in enumerate(lengths)]


@pytest.mark.parametrize("seed", range(12))
def test_dynamic_batcher_loses_and_repeats_nothing_and_keeps_the_budget(seed):
    """Random lengths (some longer than the full budget), buffer sizes and warm-up schedules, both packers: every
    sample taken from the stream is given out once or still held; a micro-batch fits its step's budget unless it is
    one sample longer than that (warm-up); a sample longer than the full budget comes out cut to it."""
    rng = np.random.default_rng(seed)
    full = int(rng.integers(2, 300))
    init, warmup = int(rng.integers(1, full + 1)), int(rng.integers(0, 30))
    budget_at = lambda j: full if j >= warmup else init + (full - init) * j // warmup
    lengths = rng.integers(1, int(full * rng.choice([0.3, 1.0, 1.5])) + 2, 2000)
    taken = []
    stream = (taken.append(s["id"]) or s for s in _samples(lengths))
    backend = ("python", "cpp")[seed % 2] if cpp_available() else "python"
    batcher = DynamicBatcher(
        stream, budget_at=budget_at, max_tokens=full, buffer_size=int(rng.integers(1, 40)), backend=backend
    )
    given = []
    for j in range(150):
        micro_batch = batcher.next_micro_batch()
        sizes = [len(s["input_ids"]) for s in micro_batch]
        assert sum(sizes) <= budget_at(j) or (len(sizes) == 1 and lengths[micro_batch[0]["id"]] > budget_at(j))
        for sample in micro_batch:
            assert len(sample["input_ids"]) == min(lengths[sample["id"]], full)
            assert sample["input_ids"].tolist() == [sample["id"]] * len(sample["input_ids"])
        given += [s["id"] for s in micro_batch]
    held = [s["id"] for s in batcher.buffer] + [s["id"] for bin_ in batcher.ready for s in bin_]
    assert len(given) == len(set(given))
    assert sorted(given + held) == taken


# ------------------------------------------------------------------------------------------------------- collators
def _random_documents(rng) -> list[dict]:
    docs = []
    for _ in range(int(rng.integers(1, 8))):
        n = int(rng.integers(1, 12))
        labels = rng.integers(0, 1000, n)
        labels[rng.random(n) < 0.3] = IGNORE_INDEX
        labels[-1] = 7  # every micro-batch trains at least one token (else the collators refuse it)
        docs.append({"input_ids": rng.integers(0, 1000, n), "labels": labels})
    return docs


@pytest.mark.parametrize("seed", range(20))
def test_packing_collators_on_random_documents(seed):
    """Packed micro-batches of random documents: position_ids restart at every cu_seqlens boundary, each document's
    first label is -100 (no token predicts across documents) and the rest are its own, dtypes and counts match."""
    rng = np.random.default_rng(seed)
    docs = _random_documents(rng)
    for collator in (DataCollatorWithPacking(), DataCollatorWithPositionIDs()):
        out = collator(docs)
        lengths = [len(d["input_ids"]) for d in docs]
        assert (
            out["cu_seqlens"].dtype == torch.int32 and out["cu_seqlens"].tolist() == np.cumsum([0, *lengths]).tolist()
        )
        for key in ("input_ids", "labels", "position_ids"):
            assert out[key].dtype == torch.int64 and out[key].shape == (1, sum(lengths))
        expected_labels = np.concatenate([np.concatenate([[IGNORE_INDEX], d["labels"][1:]]) for d in docs])
        assert out["labels"][0].tolist() == expected_labels.tolist()
        assert out["position_ids"][0].tolist() == [p for n in lengths for p in range(n)]
        assert out["input_ids"][0].tolist() == np.concatenate([d["input_ids"] for d in docs]).tolist()
        assert out["max_seqlen"] == max(lengths) and isinstance(out["max_seqlen"], int)
        assert out["num_label_tokens"] == int(np.sum(expected_labels != IGNORE_INDEX))


@pytest.mark.parametrize("seed", range(5))
def test_position_ids_collator_splits_prepacked_samples_at_zeros(seed):
    """Samples that carry position_ids (each a run of documents) give one document per run, labelled as if each run
    were a sample of its own."""
    rng = np.random.default_rng(seed)
    runs = [_random_documents(rng) for _ in range(int(rng.integers(1, 4)))]
    prepacked = [
        {
            "input_ids": np.concatenate([d["input_ids"] for d in run]),
            "labels": np.concatenate([d["labels"] for d in run]),
            "position_ids": np.concatenate([np.arange(len(d["input_ids"])) for d in run]),
        }
        for run in runs
    ]
    got = DataCollatorWithPositionIDs()(prepacked)
    expected = DataCollatorWithPacking()([d for run in runs for d in run])
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(got[key], value) if isinstance(value, torch.Tensor) else got[key] == value


def test_padding_collator_on_random_documents():
    """Right-padded rows: each row's first label -100, padding masked and untrained, counts exact."""
    docs = _random_documents(np.random.default_rng(0))
    out = DataCollatorWithPadding(pad_token_id=5)(docs)
    width = max(len(d["input_ids"]) for d in docs)
    for row, doc in enumerate(docs):
        n = len(doc["input_ids"])
        assert out["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
        assert out["input_ids"][row].tolist() == doc["input_ids"].tolist() + [5] * (width - n)
        assert out["labels"][row].tolist() == [IGNORE_INDEX, *doc["labels"][1:].tolist()] + [IGNORE_INDEX] * (width - n)
    assert out["num_label_tokens"] == int((out["labels"] != IGNORE_INDEX).sum())
    assert all(out[k].dtype == torch.int64 for k in ("input_ids", "labels", "attention_mask", "position_ids"))


# ------------------------------------------------------------------------------------------ data-parallel sharding
@pytest.mark.parametrize(("records", "ranks", "workers"), [(48, 3, 2), (50, 4, 0), (5, 5, 0)])
def test_ranks_and_workers_read_every_record_once_per_epoch(records, ranks, workers):
    """Ranks simulated in one process: each step has the same number of micro-batches on every rank, and the first
    epoch of all shards together (shards of unequal sizes too, and one record per rank) is every record once."""
    samples = [{"input_ids": [i, 1000 + i], "labels": [i, 1000 + i]} for i in range(records)]
    shards = ranks * max(workers, 1)
    seen = []
    for rank in range(ranks):
        loader = build_dataloader(
            samples, micro_batch_size=1, global_batch_size=ranks, max_seq_len=4, seed=3,
            dp_rank=rank, dp_size=ranks, num_workers=workers,
        )  # fmt: skip
        per_rank = sum(len(range(rank * max(workers, 1) + w, records, shards)) for w in range(max(workers, 1)))
        steps = [next(loader) for _ in range(per_rank)]
        assert all(len(step) == 1 for step in steps)
        seen += [mb["input_ids"][0, 0].item() for step in steps for mb in step]
    assert sorted(seen) == list(range(records))


def test_a_rank_whose_iterable_shard_is_empty_says_so(tmp_path, tokenizer):
    """3 records streamed to 4 ranks: the rank that gets none stops at its first step, naming the cause (an
    iterable dataset's size is not known before it is read)."""
    write_jsonl(tmp_path / "three.jsonl", [{"text": f"record {i}"} for i in range(3)])
    transform = partial(process_pretrain_example, tokenizer=tokenizer, max_seq_len=16)
    dataset = build_iterative_dataset(tmp_path, transform, shuffle_buffer_size=2)
    build = partial(build_dataloader, dataset, micro_batch_size=1, global_batch_size=4, max_seq_len=16, dp_size=4)
    assert next(build(dp_rank=2))[0]["num_label_tokens"] > 0
    with pytest.raises(ValueError, match=r"shard 3/4 .* got no sample in a whole epoch \(too few records"):
        next(build(dp_rank=3))


# ------------------------------------------------------------------------------------------------ the loader's state
def _roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _extras(samples: list[dict]) -> list[tuple]:
    """A custom collator: each sample's extra values with their types."""
    return [(type(s["id"]), s["id"], s["pair"], type(s["mask"]), s["mask"].tolist()) for s in samples]


@pytest.mark.parametrize(
    "value",
    [np.int64(3), np.float16(1.5), np.bool_(True), np.str_("tok"), np.bytes_(b"\x00a"), np.array([1, 2], np.uint16),
     np.array([["a", "bc"]]), np.array([1, "x", None], dtype=object), np.zeros((0, 2), np.float32)],
    ids=lambda v: f"{type(v).__name__}-{v.dtype}",
)  # fmt: skip
def test_numpy_values_survive_a_saved_state(value):
    """Every numpy scalar or array (numeric, string, bytes, object, empty) in a loader state comes back from
    ``torch.load(weights_only=True)`` with its type, dtype, shape and values."""
    restored = data_loader._to_arrays(_roundtrip(data_loader._to_tensors({"x": [value]})))["x"][0]
    assert type(restored) is type(value) and restored.dtype == value.dtype and np.shape(restored) == np.shape(value)
    assert np.array_equal(restored, value) if value.dtype != object else restored.tolist() == value.tolist()


def test_resume_keeps_numpy_scalars_tensors_and_tuples_in_samples(monkeypatch):
    """Samples (of a user's dataset) that carry numpy scalars, torch tensors and tuples: the saved state loads with
    ``weights_only=True`` and the resumed loader gives them back as they were, types included."""
    monkeypatch.setattr(data_loader, "SNAPSHOT_EVERY", 2)
    samples = [
        {"input_ids": [i] * (2 + i % 5), "labels": [i] * (2 + i % 5), "id": np.int64(i), "pair": (i, "x"),
         "mask": torch.ones(i % 3)}
        for i in range(40)
    ]  # fmt: skip
    build = lambda: build_dataloader(
        samples, micro_batch_size=1, global_batch_size=1, max_seq_len=8, rmpad=True, dyn_bsz_buffer_size=6,
        collate_fn=_extras, dp_rank=0, dp_size=1,
    )  # fmt: skip
    reference = build()
    expected = [next(reference) for _ in range(12)]
    first = build()
    head = [next(first) for _ in range(5)]
    resumed = build()
    resumed.load_state_dict(_roundtrip(first.state_dict()))
    assert head + [next(resumed) for _ in range(7)] == expected
    assert {t for step in expected for mb in step for t, *_ in mb} == {np.int64}


class _FiniteStreams(torch.utils.data.IterableDataset):
    """A user's iterable dataset whose shard streams end after 5 samples (they must be endless)."""

    def __iter__(self):
        raise NotImplementedError

    def shard_stream(self, shard: int, num_shards: int):
        return iter([{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}] * 5)


@pytest.mark.parametrize("rmpad", [False, True])
def test_a_shard_stream_that_ends_is_a_clear_error(rmpad):
    """A finite shard stream is a ValueError that says what a shard stream must be, not "generator raised
    StopIteration" from inside the loader."""
    loader = build_dataloader(
        _FiniteStreams(), micro_batch_size=2, global_batch_size=2, max_seq_len=8, rmpad=rmpad, dp_rank=0, dp_size=1
    )
    with pytest.raises(ValueError, match=r"sample stream of shard 0 of 1 ended: .*must return an endless iterator"):
        for _ in range(5):
            next(loader)


class _StreamOf(torch.utils.data.IterableDataset):
    """A user's iterable dataset whose every shard stream repeats ``sample`` (list values, as a transform gives)."""

    def __init__(self, sample):
        self.sample = sample

    def __iter__(self):
        raise NotImplementedError

    def shard_stream(self, shard: int, num_shards: int):
        return itertools.repeat(self.sample)


@pytest.mark.parametrize(
    ("sample", "error", "match"),
    [
        ({"input_ids": [1, 2, 3]}, TypeError, r"_StreamOf.shard_stream\(0, 1\): a sample must be a dict with"),
        ([{"input_ids": [1, 2], "labels": [1, 2]}], TypeError, r"gives one sample dict at a time"),
        ({"input_ids": [1, 2, 3], "labels": [1, 2]}, ValueError, r"_StreamOf.shard_stream\(0, 1\): sample has 3"),
        ({"input_ids": [1, 2], "labels": [1, -100]}, ValueError, r"shard_stream\(0, 1\): sample has no trainable"),
    ],
)
def test_a_custom_shard_streams_samples_are_checked(sample, error, match):
    """A user's shard stream is checked sample by sample, as a map-style dataset's items are: an error naming the
    stream, not a KeyError or a shape error inside the collator."""
    loader = build_dataloader(
        _StreamOf(sample), micro_batch_size=1, global_batch_size=1, max_seq_len=8, rmpad=True, dp_rank=0, dp_size=1
    )
    with pytest.raises(error, match=match):
        next(loader)


def test_a_custom_shard_stream_of_lists_trains():
    """Good samples with list values come out of a custom stream as int64 arrays, collated as usual."""
    loader = build_dataloader(
        _StreamOf({"input_ids": [5, 6, 7], "labels": [5, 6, 7]}), micro_batch_size=1, global_batch_size=1,
        max_seq_len=8, rmpad=True, dp_rank=0, dp_size=1,
    )  # fmt: skip
    (micro_batch,) = next(loader)
    assert micro_batch["input_ids"].tolist() == [[5, 6, 7, 5, 6, 7]] and micro_batch["num_label_tokens"] == 4
