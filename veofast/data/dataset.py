"""Datasets over JSONL and Parquet files: ``build_mapping_dataset`` and ``build_iterative_dataset``.

Both apply a transform (``veofast.data.data_transform``) to each record and flatten its list of samples. For
the dataloader, a dataset is read through *shard streams*: shard ``s`` of ``n`` (``n = dp_size * workers``,
``s = dp_rank * workers + worker_id``) is an endless iterator of samples with ``state_dict()`` /
``load_state_dict()``, so a run resumed from a saved state sees exactly the samples it had not seen yet.

- ``MappingDataset`` (small data): records are read into memory when built; each data epoch visits a fresh
  permutation of them (seeded by ``seed`` and the epoch), shard ``s`` taking every ``n``-th record.
- ``IterativeDataset`` (large data): files are streamed, never loaded whole; each data epoch shuffles the
  file order (``seed``, epoch), record ``k`` of the stream goes to shard ``k % n``, and each shard shuffles its
  samples through a buffer of ``shuffle_buffer_size`` (drained at the end of the epoch, so epochs do not mix).
  Every shard reads every file but parses only its own records.

Custom datasets plug in two ways:

1. Any map-style ``torch.utils.data.Dataset`` (``__len__``, ``__getitem__``) whose items are a sample or a
   list of samples: the dataloader shards and shuffles it like a ``MappingDataset``.
2. An iterable dataset with ``shard_stream(shard, num_shards)`` returning an endless iterator of samples that
   has ``state_dict()`` and ``load_state_dict(state)`` (see ``IterableShardStream``); the loader checks each
   sample as it checks a map-style dataset's items (``CheckedShardStream``).

Inside streams, samples hold their ``input_ids`` and ``labels`` as int64 numpy arrays (cheap to copy between
processes and to collate); the public ``__getitem__``/``__iter__`` give lists, as transforms do.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from veofast.data.records import (
    BadRecordError,
    BadRecordPolicy,
    RecordReader,
    resolve_data_files,
    start_position,
)

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
Transform = Callable[[dict], "dict | list[dict]"]


def check_samples(output, where: str) -> list[dict]:
    """A transform's output as a list of samples; ``BadRecordError`` if a sample is malformed or untrainable.

    A sample needs ``input_ids`` and ``labels`` of equal, non-zero length and at least one label != -100 after
    its first position (the first token of a sample is never predicted).
    """
    samples = [output] if isinstance(output, dict) else output
    if not isinstance(samples, list):
        raise TypeError(f"{where}: the transform must return a dict or a list of dicts, got {type(output).__name__}")
    for sample in samples:
        if not isinstance(sample, dict) or "input_ids" not in sample or "labels" not in sample:
            raise TypeError(f"{where}: a sample must be a dict with 'input_ids' and 'labels', got {sample!r:.100}")
        n, m = len(sample["input_ids"]), len(sample["labels"])
        if n != m or n == 0:
            raise BadRecordError(f"sample has {n} input_ids and {m} labels (need equal, non-zero lengths)")
        labels = sample["labels"]
        trainable = (
            np.any(labels[1:] != IGNORE_INDEX)
            if isinstance(labels, np.ndarray)
            else any(label != IGNORE_INDEX for label in labels[1:])
        )
        if not trainable:
            raise BadRecordError("sample has no trainable label (all labels after the first are -100)")
    return samples


def as_arrays(sample: dict) -> dict:
    """The sample with ``input_ids`` and ``labels`` as int64 numpy arrays (other keys unchanged)."""
    out = dict(sample)
    out["input_ids"] = np.asarray(sample["input_ids"], dtype=np.int64)
    out["labels"] = np.asarray(sample["labels"], dtype=np.int64)
    return out


def as_lists(sample: dict) -> dict:
    """The sample with numpy values turned back into lists."""
    return {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in sample.items()}


def _transform_record(transform: Transform, where: str, record, policy: BadRecordPolicy) -> list[dict]:
    """``transform(record)`` checked and flattened; ``[]`` for a bad record that the policy skips."""
    try:
        if isinstance(record, BadRecordError):
            raise record
        return check_samples(transform(record), where)
    except BadRecordError as exc:
        policy.handle(where, str(exc))
        return []


class MappingDataset(torch.utils.data.Dataset):
    """Records held in memory; ``dataset[i]`` is the list of samples of record ``i`` (``[]`` if skipped)."""

    def __init__(self, files: Sequence[str], transform: Transform, *, on_bad_record: str = "raise") -> None:
        self.transform = transform
        self.policy = BadRecordPolicy(on_bad_record)
        self._records: list[tuple[str, dict]] = []
        for path in files:
            for where, record in RecordReader([path], 0, 1):
                if isinstance(record, BadRecordError):
                    self.policy.handle(where, str(record))
                else:
                    self._records.append((where, record))
        if not self._records:
            raise ValueError(f"the dataset is empty: no usable record in {list(files)}")

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> list[dict]:
        return [as_lists(s) for s in self.samples(index)]

    def samples(self, index: int) -> list[dict]:
        """Record ``index``'s samples with numpy token arrays (what shard streams use)."""
        where, record = self._records[index]
        return [as_arrays(s) for s in _transform_record(self.transform, where, record, self.policy)]


class MappingShardStream:
    """Shard ``shard`` of ``num_shards`` of a map-style dataset, endless, a fresh permutation each epoch.

    State: ``{"epoch", "cursor" (records of this shard visited in the epoch), "pending" (samples of the last
    record not yet given out), "produced" (samples given out in the epoch)}``.
    """

    def __init__(self, dataset, shard: int, num_shards: int, *, seed: int) -> None:
        if len(dataset) < num_shards:
            raise ValueError(
                f"the dataset has {len(dataset)} records, fewer than the {num_shards} shards "
                "(dp_size * max(num_workers, 1)) that read it: use fewer workers or more data"
            )
        self.dataset, self.shard, self.num_shards, self.seed = dataset, shard, num_shards, seed
        self.epoch, self.cursor, self.pending, self.produced = 0, 0, [], 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        permutation = np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))
        return permutation[self.shard :: self.num_shards]

    def _samples(self, index: int) -> list[dict]:
        if isinstance(self.dataset, MappingDataset):
            return self.dataset.samples(index)
        where = f"{type(self.dataset).__name__}[{index}]"
        return [as_arrays(s) for s in check_samples(self.dataset[index], where)]

    @property
    def epoch_finished(self) -> bool:
        """True once every sample of the current epoch has been given out."""
        return self.cursor == len(self._order) and not self.pending

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        while not self.pending:
            if self.cursor == len(self._order):
                if self.produced == 0:
                    raise ValueError(f"shard {self.shard}/{self.num_shards}: every record of an epoch was skipped")
                self.epoch, self.cursor, self.produced = self.epoch + 1, 0, 0
                self._order = self._epoch_order(self.epoch)
            self.pending = self._samples(int(self._order[self.cursor]))
            self.cursor += 1
        self.produced += 1
        return self.pending.pop(0)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "pending": list(self.pending), "produced": self.produced}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor, self.pending = state["epoch"], state["cursor"], list(state["pending"])
        self.produced = state["produced"]
        self._order = self._epoch_order(self.epoch)


class IterableShardStream:
    """Shard ``shard`` of ``num_shards`` of an ``IterativeDataset``: streamed, shuffled through a buffer, endless.

    Within an epoch: read this shard's next record, transform it, add its samples to the buffer; while the
    buffer holds ``buffer_size`` samples, give out a uniformly random one. At the end of the epoch the buffer
    is drained in random order, then the next epoch starts with a new file order.
    State: ``{"epoch", "position" (see ``RecordReader``), "buffer", "draining", "rng", "produced"}``.
    """

    def __init__(self, dataset: IterativeDataset, shard: int, num_shards: int) -> None:
        self.dataset, self.shard, self.num_shards = dataset, shard, num_shards
        self.policy = BadRecordPolicy(dataset.on_bad_record)
        self._start_epoch(0)

    def _start_epoch(self, epoch: int) -> None:
        self.epoch, self.position, self.buffer, self.draining, self.produced = epoch, start_position(), [], False, 0
        self.rng = np.random.default_rng([self.dataset.seed, epoch, self.shard])
        self._reader: Iterator | None = None

    def _files(self) -> list[str]:
        files = self.dataset.files
        order = np.random.default_rng([self.dataset.seed, self.epoch]).permutation(len(files))
        return [files[i] for i in order]

    @property
    def epoch_finished(self) -> bool:
        """True once every sample of the current epoch has been given out."""
        return self.draining and not self.buffer

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        while True:
            if self.buffer and (self.draining or len(self.buffer) >= self.dataset.shuffle_buffer_size):
                j = int(self.rng.integers(len(self.buffer)))
                self.buffer[j], self.buffer[-1] = self.buffer[-1], self.buffer[j]
                self.produced += 1
                return self.buffer.pop()
            if self.draining:
                if self.produced == 0:
                    raise ValueError(
                        f"shard {self.shard}/{self.num_shards} of {self.dataset.files} got no sample in a whole epoch "
                        "(too few records for dp_size * num_workers shards, or every record was skipped)"
                    )
                self._start_epoch(self.epoch + 1)
            if self._reader is None:
                reader = RecordReader(self._files(), self.shard, self.num_shards, self.position)
                self.position = reader.position  # the reader advances it
                self._reader = iter(reader)
            item = next(self._reader, None)
            if item is None:
                self.draining = True
                continue
            where, record = item
            samples = _transform_record(self.dataset.transform, where, record, self.policy)
            self.buffer.extend(as_arrays(s) for s in samples)

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": dict(self.position),
            "buffer": list(self.buffer),
            "draining": self.draining,
            "rng": self.rng.bit_generator.state,
            "produced": self.produced,
        }

    def load_state_dict(self, state: dict) -> None:
        self._start_epoch(state["epoch"])
        self.position, self.buffer = dict(state["position"]), list(state["buffer"])
        self.draining, self.produced = state["draining"], state["produced"]
        self.rng.bit_generator.state = state["rng"]


class CheckedShardStream:
    """A custom dataset's shard stream (its ``shard_stream(shard, num_shards)``), each sample checked as a
    map-style dataset's are (``check_samples``: a ``TypeError`` or ``BadRecordError`` naming the stream) and given
    out with ``input_ids`` / ``labels`` as int64 arrays. ``state_dict`` / ``load_state_dict`` are the stream's."""

    def __init__(self, stream, where: str) -> None:
        self.stream, self.where = stream, where

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        sample = next(self.stream)
        if not isinstance(sample, dict):
            raise TypeError(f"{self.where}: a shard stream gives one sample dict at a time, got {sample!r:.100}")
        try:
            check_samples(sample, self.where)
        except BadRecordError as exc:
            raise BadRecordError(f"{self.where}: {exc}") from None
        return as_arrays(sample)

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)


class IterativeDataset(torch.utils.data.IterableDataset):
    """Records streamed from files (see the module doc). For the dataloader: ``shard_stream``.

    Iterated directly, it yields one data epoch of its shard (data-parallel rank from the parallel state if
    initialized, dataloader worker from torch) as lists; ``state_dict``/``load_state_dict`` save and restore
    that in-process position (with workers, use ``build_dataloader``, which saves every worker's).
    """

    def __init__(
        self,
        files: Sequence[str],
        transform: Transform,
        *,
        seed: int = 0,
        shuffle_buffer_size: int = 1000,
        on_bad_record: str = "raise",
    ) -> None:
        if shuffle_buffer_size < 1:
            raise ValueError(f"shuffle_buffer_size must be >= 1, got {shuffle_buffer_size}")
        BadRecordPolicy(on_bad_record)  # validates the mode here, not in a worker
        self.files, self.transform, self.seed = list(files), transform, seed
        self.shuffle_buffer_size, self.on_bad_record = shuffle_buffer_size, on_bad_record
        self._stream: IterableShardStream | None = None
        self._saved: dict | None = None

    def shard_stream(self, shard: int, num_shards: int) -> IterableShardStream:
        return IterableShardStream(self, shard, num_shards)

    def __iter__(self) -> Iterator[dict]:
        from veofast.distributed.parallel_state import get_parallel_state, is_parallel_state_initialized

        rank, ranks = (0, 1)
        if is_parallel_state_initialized():
            state = get_parallel_state()
            rank, ranks = state.dp_rank, state.dp_size
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        shard, num_shards = rank * workers + worker, ranks * workers
        if self._stream is None or (self._stream.shard, self._stream.num_shards) != (shard, num_shards):
            self._stream = self.shard_stream(shard, num_shards)
        if self._saved is not None:
            self._stream.load_state_dict(self._saved)
            self._saved = None
        stream = self._stream
        while True:
            sample = next(stream)
            yield as_lists(sample)
            if stream.epoch_finished:
                return

    def state_dict(self) -> dict:
        """Where in-process iteration stands (the shard stream's state)."""
        if self._saved is not None:
            return self._saved
        return self._stream.state_dict() if self._stream is not None else {}

    def load_state_dict(self, state: dict) -> None:
        """Resume in-process iteration from ``state`` at the next ``iter()``."""
        self._saved = state or None


def build_mapping_dataset(
    data_path: str | os.PathLike | Sequence[str], transform: Transform, *, on_bad_record: str = "raise"
) -> MappingDataset:
    """A ``MappingDataset`` over the ``.jsonl``/``.parquet`` files that ``data_path`` names (file, directory,
    glob or a list of them); records are read now, transformed when indexed."""
    return MappingDataset(resolve_data_files(data_path), transform, on_bad_record=on_bad_record)


def build_iterative_dataset(
    data_path: str | os.PathLike | Sequence[str],
    transform: Transform,
    seed: int = 0,
    *,
    shuffle_buffer_size: int = 1000,
    on_bad_record: str = "raise",
) -> IterativeDataset:
    """An ``IterativeDataset`` streaming the ``.jsonl``/``.parquet`` files that ``data_path`` names, shuffled by
    ``seed`` (file order per epoch and a per-shard buffer of ``shuffle_buffer_size`` samples)."""
    files = resolve_data_files(data_path)
    for path in files:
        if os.path.getsize(path) == 0:
            logger.warning("data file %s is empty", path)
    if all(os.path.getsize(p) == 0 for p in files):
        raise ValueError(f"the dataset is empty: every file of {data_path!r} is empty")
    return IterativeDataset(
        files, transform, seed=seed, shuffle_buffer_size=shuffle_buffer_size, on_bad_record=on_bad_record
    )


__all__ = [
    "CheckedShardStream",
    "IterableShardStream",
    "IterativeDataset",
    "MappingDataset",
    "MappingShardStream",
    "build_iterative_dataset",
    "build_mapping_dataset",
    "check_samples",
]
