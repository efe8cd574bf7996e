"""``build_dataloader``: an endless, resumable loader that yields one optimizer step of micro-batches per ``next()``.

Each data-parallel rank reads its own shards of the dataset (``dp_size * max(num_workers, 1)`` shards in all,
see ``veofast.data.dataset``). Every worker (or the main process when ``num_workers == 0``) reads its shard,
forms micro-batches (``veofast.data.dynamic_batching``) and collates them, and the main process takes the
workers' micro-batches in strict round robin: micro-batch ``m`` of this rank comes from worker
``m % workers``. ``next(loader)`` returns a list of ``global_batch_size // (micro_batch_size * dp_size)``
micro-batches (the gradient-accumulation count); with dynamic batching each is packed under a budget of
``micro_batch_size * max_seq_len - dyn_bsz_margin`` tokens (less during the batch-size warm-up).

The loader never ends: data epochs follow one another, each re-shuffled (seed + epoch); the training loop
stops after its ``train_steps`` (the seed's loop calls ``iter()`` per epoch, which continues where it was).
``drop_last`` therefore never drops anything and is accepted for the seed's API.

Exact resume: every ``SNAPSHOT_EVERY`` micro-batches a worker sends its state along with the micro-batch;
``state_dict()`` holds, per worker, the last snapshot and how many micro-batches were consumed after it.
After ``load_state_dict()`` the workers restore their snapshot and silently re-form (without collating) the
micro-batches consumed since, so the resumed loader continues with exactly the micro-batch that the saved one
would have given next. Resuming needs the same dataset, seed, dp_size, num_workers and batching arguments;
``load_state_dict`` refuses a state saved with other ones (the dataset by its kind and size, see
``dataset_signature``).
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections.abc import Callable

import numpy as np
import torch

from veofast.data.data_collator import DataCollatorWithPacking, DataCollatorWithPadding, DataCollatorWithPositionIDs
from veofast.data.dataset import CheckedShardStream, IterativeDataset, MappingShardStream
from veofast.data.dynamic_batching import DynamicBatcher, FixedBatcher
from veofast.data.packing import MAX_BUDGET

logger = logging.getLogger(__name__)

SNAPSHOT_EVERY = 32
STATE_FORMAT = "veofast.dataloader/1"


class _Snapshot:
    """A worker's state riding along with a micro-batch; opaque, so pin_memory does not walk into it."""

    __slots__ = ("state",)

    def __init__(self, state: dict | None) -> None:
        self.state = state


def _identity(item):
    return item


# How often a loader worker checks that the process that started it is alive.
_PARENT_POLL_S = 0.2


def _exit_with_parent(worker_id: int) -> None:
    """A loader worker's ``worker_init_fn``: a daemon thread ends the worker once the process that started it has
    died (the worker is then re-parented).

    torch's workers notice a dead parent only by polling every 5 s, and one whose output still waits in the pipe to
    the dead parent (a resume snapshot is larger than the pipe) then blocks forever at exit, holding its shared
    memory and open files: a training process killed outright (SIGTERM or SIGKILL to it, the OOM killer) left such
    workers behind."""
    parent = os.getppid()  # the training process, or the forkserver under that start method

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(_PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="veofast-loader-parent-watch", daemon=True).start()


def check_dataset(dataset, num_shards: int) -> None:
    """``TypeError`` for a dataset the loader cannot shard, ``ValueError`` for one with fewer records than shards."""
    if hasattr(dataset, "shard_stream"):
        return
    if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__getitem__"):
        raise TypeError(
            f"build_dataloader: {type(dataset).__name__} has no shard_stream(shard, num_shards); an iterable dataset "
            "must provide one (see veofast.data.dataset), or use a map-style dataset (__len__ and __getitem__)"
        )
    if len(dataset) < num_shards:
        raise ValueError(
            f"build_dataloader: the dataset has {len(dataset)} records, fewer than the {num_shards} shards "
            "(dp_size * max(num_workers, 1)) that read it: use fewer workers or more data"
        )


def open_shard_stream(dataset, shard: int, num_shards: int, *, seed: int):
    """The endless sample stream of shard ``shard`` of ``num_shards`` (see ``veofast.data.dataset``)."""
    if isinstance(dataset, IterativeDataset):
        return dataset.shard_stream(shard, num_shards)
    if hasattr(dataset, "shard_stream"):  # a user's: its samples are checked as a map-style dataset's items are
        where = f"{type(dataset).__name__}.shard_stream({shard}, {num_shards})"
        return CheckedShardStream(dataset.shard_stream(shard, num_shards), where)
    return MappingShardStream(dataset, shard, num_shards, seed=seed)


class BudgetSchedule:
    """Token budget of a packed micro-batch at each optimizer step: linear warm-up from ``init_tokens`` to
    ``full_tokens`` over ``warmup_steps`` steps, then ``full_tokens``."""

    def __init__(self, full_tokens: int, *, init_tokens: int, warmup_steps: int) -> None:
        self.full_tokens, self.init_tokens, self.warmup_steps = full_tokens, min(init_tokens, full_tokens), warmup_steps

    def __call__(self, step: int) -> int:
        if step >= self.warmup_steps:
            return self.full_tokens
        return self.init_tokens + (self.full_tokens - self.init_tokens) * step // self.warmup_steps


class _MicroBatchSource(torch.utils.data.IterableDataset):
    """What each worker runs: shard stream -> batcher -> collate, forever, tagged ``(worker, index, mb, snap)``.

    ``resume`` (set by the loader before it starts workers): per worker, a snapshot (or None: the start) and
    how many micro-batches to re-form after it.
    """

    def __init__(self, dataset, collate_fn: Callable, schedule: BudgetSchedule | None, **config) -> None:
        self.dataset, self.collate_fn, self.schedule, self.config = dataset, collate_fn, schedule, config
        self.resume: list[dict] | None = None

    def _batcher(self, stream, worker: int):
        cfg, schedule = self.config, self.schedule
        if schedule is None:
            return FixedBatcher(stream, micro_batch_size=cfg["micro_batch_size"], max_seq_len=cfg["max_seq_len"])
        workers, per_step = cfg["workers"], cfg["num_micro_batches"]
        return DynamicBatcher(
            stream,
            budget_at=lambda j: schedule((j * workers + worker) // per_step),  # j-th of this worker: m = j*W + w
            max_tokens=schedule.full_tokens,
            buffer_size=cfg["dyn_bsz_buffer_size"],
        )

    def __iter__(self):
        cfg = self.config
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        shard, num_shards = cfg["dp_rank"] * cfg["workers"] + worker, cfg["dp_size"] * cfg["workers"]
        stream = open_shard_stream(self.dataset, shard, num_shards, seed=cfg["seed"])
        batcher = self._batcher(stream, worker)
        if self.resume is not None:
            snapshot, replay = self.resume[worker]["snapshot"], self.resume[worker]["replay"]
            if snapshot is not None:
                stream.load_state_dict(snapshot["stream"])
                batcher.load_state_dict(snapshot["batcher"])
            for _ in range(replay):
                _form_micro_batch(batcher, shard, num_shards)
        while True:
            index = batcher.emitted
            micro_batch = self.collate_fn(_form_micro_batch(batcher, shard, num_shards))
            state = None
            if (index + 1) % SNAPSHOT_EVERY == 0:
                state = {"stream": stream.state_dict(), "batcher": batcher.state_dict()}
            yield worker, index, micro_batch, _Snapshot(state)


def _form_micro_batch(batcher, shard: int, num_shards: int) -> list[dict]:
    """The batcher's next micro-batch; ``ValueError`` if its shard stream ended (shard streams are endless)."""
    try:
        return batcher.next_micro_batch()
    except StopIteration:  # would otherwise surface as "RuntimeError: generator raised StopIteration"
        raise ValueError(
            f"build_dataloader: the sample stream of shard {shard} of {num_shards} ended: a dataset's "
            "shard_stream(shard, num_shards) must return an endless iterator (one data epoch after another, see "
            "veofast.data.dataset)"
        ) from None


_NUMPY = "__numpy__"  # a numpy array or scalar inside a saved state, tagged by ``_numpy_to_saveable``


def _map_leaves(obj, is_leaf: Callable, convert: Callable):
    """``obj`` with ``convert(x)`` for each ``x`` that ``is_leaf``, looking into the other dicts, lists and tuples."""
    if is_leaf(obj):
        return convert(obj)
    if isinstance(obj, dict):
        return {k: _map_leaves(v, is_leaf, convert) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_map_leaves(v, is_leaf, convert) for v in obj]
    if isinstance(obj, tuple):  # a named tuple too (torch.load(weights_only=True) would refuse its class)
        return tuple(_map_leaves(v, is_leaf, convert) for v in obj)
    return obj


def _numpy_to_saveable(x: np.ndarray | np.generic) -> dict:
    """A numpy array or scalar as ``{_NUMPY: values, "dtype": str, "scalar": bool}``: the values as a CPU tensor for
    the dtypes torch has, else (strings, bytes, objects) as nested Python lists."""
    array = np.asarray(x)
    try:
        values = torch.from_numpy(array)
    except TypeError:
        values = array.tolist()
    return {_NUMPY: values, "dtype": array.dtype.str, "scalar": isinstance(x, np.generic)}


def _numpy_from_saveable(tagged: dict) -> np.ndarray | np.generic:
    """The inverse of ``_numpy_to_saveable``."""
    values = tagged[_NUMPY]
    array = values.numpy() if isinstance(values, torch.Tensor) else np.array(values, dtype=tagged["dtype"])
    return array[()] if tagged["scalar"] else array


def _to_tensors(state):
    """``state`` with each numpy array or scalar tagged so that ``torch.load(weights_only=True)`` reads it, and
    ``_to_arrays`` gives back exactly ``state`` (torch tensors, tuples and plain values stay as they are)."""
    return _map_leaves(state, lambda x: isinstance(x, (np.ndarray, np.generic)), _numpy_to_saveable)


def _to_arrays(state):
    """The inverse of ``_to_tensors``."""
    return _map_leaves(state, lambda x: isinstance(x, dict) and _NUMPY in x, _numpy_from_saveable)


def dataset_signature(dataset) -> str:
    """What a saved loader position depends on in ``dataset``, as a phrase: its kind (class name) and size (records of
    a map-style dataset, files of an ``IterativeDataset``), e.g. ``"MappingDataset of 9000 records"``. A position
    saved over another kind of dataset cannot be restored (a worker failed on it with a bare ``KeyError``, or, before
    its first snapshot, replayed other data in silence), and one over another number of records or files points at
    other records."""
    kind = type(dataset).__name__
    if isinstance(dataset, IterativeDataset):
        count, unit = len(dataset.files), "file"
    elif not isinstance(dataset, torch.utils.data.IterableDataset) and hasattr(dataset, "__len__"):
        count, unit = len(dataset), "record"
    else:
        return kind
    return f"{kind} of {count} {unit}" + ("s" if count != 1 else "")


class DistributedDataloader:
    """The loader ``build_dataloader`` returns: ``next()`` gives a list of micro-batch dicts (one step).

    Attributes: ``num_micro_batches`` (micro-batches per step), ``token_budget`` (tokens per packed
    micro-batch after warm-up, or None when padding), ``dp_rank``, ``dp_size``.
    """

    def __init__(
        self,
        dataset,
        *,
        micro_batch_size: int,
        num_micro_batches: int,
        max_seq_len: int,
        seed: int,
        collate_fn: Callable,
        schedule: BudgetSchedule | None,
        dyn_bsz_buffer_size: int,
        num_workers: int,
        pin_memory: bool,
        prefetch_factor: int | None,
        dp_rank: int,
        dp_size: int,
    ) -> None:
        self.dataset, self.micro_batch_size, self.num_micro_batches = dataset, micro_batch_size, num_micro_batches
        self.max_seq_len, self.seed, self.collate_fn, self.schedule = max_seq_len, seed, collate_fn, schedule
        self.dyn_bsz_buffer_size, self.num_workers = dyn_bsz_buffer_size, num_workers
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.workers = max(num_workers, 1)
        self.token_budget = schedule.full_tokens if schedule is not None else None
        self._source = _MicroBatchSource(
            dataset,
            collate_fn,
            schedule,
            micro_batch_size=micro_batch_size,
            num_micro_batches=num_micro_batches,
            max_seq_len=max_seq_len,
            seed=seed,
            dyn_bsz_buffer_size=dyn_bsz_buffer_size,
            workers=self.workers,
            dp_rank=dp_rank,
            dp_size=dp_size,
        )
        self._iterator = None
        self._served = 0
        self._consumed = [0] * self.workers
        self._snapshots: list[dict | None] = [None] * self.workers
        self._snapshot_index = [0] * self.workers
        self._pending: list[collections.deque] = []

    def __iter__(self) -> DistributedDataloader:
        return self

    def __next__(self) -> list[dict]:
        return [self._next_micro_batch() for _ in range(self.num_micro_batches)]

    def _start(self) -> None:
        self._source.resume = [
            {"snapshot": self._snapshots[w], "replay": self._consumed[w] - self._snapshot_index[w]}
            for w in range(self.workers)
        ]
        extra = {"prefetch_factor": self.prefetch_factor} if self.num_workers and self.prefetch_factor else {}
        # torch's loader draws its workers' base seed from ``generator``, by default the global RNG: every (re)start
        # would then shift the training RNG by one draw, and a resumed run (whose loader starts again) would not
        # continue the random stream of an uninterrupted one.
        loader = torch.utils.data.DataLoader(
            self._source,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            collate_fn=_identity,
            generator=torch.Generator().manual_seed(self.seed),
            worker_init_fn=_exit_with_parent,
            **extra,
        )
        self._iterator = iter(loader)
        self._pending = [collections.deque() for _ in range(self.workers)]

    def _next_micro_batch(self) -> dict:
        if self._iterator is None:
            self._start()
        worker = self._served % self.workers
        while not self._pending[worker]:
            item = next(self._iterator)
            self._pending[item[0]].append(item)
        _, index, micro_batch, snapshot = self._pending[worker].popleft()
        assert index == self._consumed[worker], (index, self._consumed[worker])
        self._consumed[worker] += 1
        if snapshot.state is not None:
            self._snapshots[worker], self._snapshot_index[worker] = snapshot.state, index + 1
        self._served += 1
        return micro_batch

    def _signature(self) -> dict:
        return {
            "dataset": dataset_signature(self.dataset),
            "dp_rank": self.dp_rank,
            "dp_size": self.dp_size,
            "num_workers": self.num_workers,
            "micro_batch_size": self.micro_batch_size,
            "num_micro_batches": self.num_micro_batches,
            "max_seq_len": self.max_seq_len,
            "token_budget": self.token_budget,
            "seed": self.seed,
            # packing only: they decide which samples go together (None when padding)
            "dyn_bsz_buffer_size": self.dyn_bsz_buffer_size if self.schedule is not None else None,
            "warmup": (self.schedule.init_tokens, self.schedule.warmup_steps) if self.schedule is not None else None,
        }

    def state_dict(self) -> dict:
        """Where this rank's loader stands; plain Python values and CPU tensors (``torch.save``-able, and
        readable with ``torch.load(weights_only=True)``)."""
        return {
            "format": STATE_FORMAT,
            **self._signature(),
            "micro_batches_served": self._served,
            "workers": [
                {
                    "consumed": self._consumed[w],
                    "snapshot_index": self._snapshot_index[w],
                    "snapshot": _to_tensors(self._snapshots[w]),
                }
                for w in range(self.workers)
            ],
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (from ``state_dict()`` of a loader built with the same arguments)."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"load_state_dict: not a {STATE_FORMAT} state (got keys {sorted(state or {})})")
        # a key that a state from an earlier veofast lacks is not checked
        mismatched = {k: (state[k], v) for k, v in self._signature().items() if state.get(k, v) != v}
        if mismatched:
            raise ValueError(
                "load_state_dict: the saved loader was built with other arguments (saved, now): "
                + ", ".join(f"{k}={a!r} vs {b!r}" for k, (a, b) in mismatched.items())
            )
        self._iterator = None  # shuts the running workers down
        self._served = state["micro_batches_served"]
        self._consumed = [w["consumed"] for w in state["workers"]]
        self._snapshot_index = [w["snapshot_index"] for w in state["workers"]]
        self._snapshots = [_to_arrays(w["snapshot"]) for w in state["workers"]]


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"build_dataloader: {name} must be a positive int, got {value!r}")
    return value


def build_dataloader(
    dataset,
    micro_batch_size: int,
    global_batch_size: int,
    dataloader_batch_size: int | None = None,
    seed: int = 0,
    max_seq_len: int | None = None,
    collate_fn: Callable | None = None,
    train_steps: int | None = None,
    rmpad: bool = False,
    rmpad_with_pos_ids: bool = False,
    bsz_warmup_ratio: float = 0.0,
    bsz_warmup_init_mbtoken: int = 200,
    dyn_bsz_margin: int = 0,
    dyn_bsz_buffer_size: int = 200,
    num_workers: int = 0,
    drop_last: bool = True,
    pin_memory: bool = False,
    prefetch_factor: int | None = None,
    dp_rank: int | None = None,
    dp_size: int | None = None,
) -> DistributedDataloader:
    """Build this data-parallel rank's loader (behaviour in the module doc).

    Args:
        dataset: a ``MappingDataset``/``IterativeDataset``, any map-style dataset, or an iterable dataset with
            ``shard_stream`` (see ``veofast.data.dataset``).
        micro_batch_size: samples per micro-batch when padding; with ``rmpad``/``rmpad_with_pos_ids`` the token
            budget of a micro-batch is ``micro_batch_size * max_seq_len - dyn_bsz_margin``.
        global_batch_size: samples (padding) or ``max_seq_len``-token units (packing) per optimizer step over all
            ranks; must be a multiple of ``micro_batch_size * dp_size``.
        dataloader_batch_size: micro-batches per ``next()``; derived as ``global_batch_size // (micro_batch_size *
            dp_size)`` and must equal that if given.
        seed: shuffling seed of map-style datasets (an ``IterativeDataset`` uses the seed it was built with).
        max_seq_len: longest sample when padding; longer ones are truncated (counted in the log). When packing,
            a sample is cut only at the full micro-batch budget (the transforms have cut it to
            ``data.max_seq_len`` already).
        collate_fn: replaces the default collator (``DataCollatorWithPadding``/``WithPacking``/``WithPositionIDs``);
            it gets the list of samples of one micro-batch.
        train_steps: optimizer steps per epoch, used for the warm-up length ``int(bsz_warmup_ratio * train_steps)``.
        rmpad, rmpad_with_pos_ids: dynamic batching with packing (at most one of them).
        bsz_warmup_ratio, bsz_warmup_init_mbtoken: the packed budget grows linearly from
            ``bsz_warmup_init_mbtoken`` tokens to the full budget over the warm-up steps.
        dyn_bsz_margin: tokens left free in every packed micro-batch.
        dyn_bsz_buffer_size: samples packed together (more: fuller micro-batches, more memory).
        num_workers, pin_memory, prefetch_factor: as in ``torch.utils.data.DataLoader`` (``prefetch_factor`` is
            ignored without workers).
        drop_last: accepted for the seed's API; the loader is endless, so there is no last partial batch.
        dp_rank, dp_size: default to the parallel state's data-parallel rank and size (0 and 1 without one).
    """
    micro_batch_size = _positive_int("micro_batch_size", micro_batch_size)
    global_batch_size = _positive_int("global_batch_size", global_batch_size)
    max_seq_len = _positive_int("max_seq_len", max_seq_len)
    if max_seq_len < 2:
        raise ValueError("build_dataloader: max_seq_len must be >= 2 (a sample needs 2 tokens to train one), got 1")
    if dp_rank is None or dp_size is None:
        from veofast.distributed.parallel_state import get_parallel_state, is_parallel_state_initialized

        state = get_parallel_state() if is_parallel_state_initialized() else None
        dp_rank = dp_rank if dp_rank is not None else (state.dp_rank if state else 0)
        dp_size = dp_size if dp_size is not None else (state.dp_size if state else 1)
    dp_size = _positive_int("dp_size", dp_size)
    if isinstance(dp_rank, bool) or not isinstance(dp_rank, int) or not 0 <= dp_rank < dp_size:
        raise ValueError(f"build_dataloader: dp_rank must be in [0, dp_size={dp_size}), got {dp_rank!r}")
    if global_batch_size % (micro_batch_size * dp_size):
        raise ValueError(
            f"build_dataloader: global_batch_size={global_batch_size} is not a multiple of micro_batch_size="
            f"{micro_batch_size} * dp_size={dp_size}"
        )
    num_micro_batches = global_batch_size // (micro_batch_size * dp_size)
    if dataloader_batch_size is not None and dataloader_batch_size != num_micro_batches:
        raise ValueError(
            f"build_dataloader: dataloader_batch_size={dataloader_batch_size} must equal global_batch_size // "
            f"(micro_batch_size * dp_size) = {num_micro_batches} (or be left None)"
        )
    if rmpad and rmpad_with_pos_ids:
        raise ValueError("build_dataloader: set at most one of rmpad and rmpad_with_pos_ids")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"build_dataloader: num_workers must be an int >= 0, got {num_workers!r}")
    if not isinstance(drop_last, bool):
        raise TypeError(f"build_dataloader: drop_last must be a bool, got {drop_last!r}")
    if prefetch_factor is not None and num_workers == 0:
        logger.info("build_dataloader: prefetch_factor=%s ignored with num_workers=0", prefetch_factor)

    schedule = None
    if rmpad or rmpad_with_pos_ids:
        full = micro_batch_size * max_seq_len - dyn_bsz_margin
        if not 0 <= dyn_bsz_margin <= micro_batch_size * max_seq_len - 2:
            raise ValueError(
                "build_dataloader: dyn_bsz_margin must be in [0, micro_batch_size * max_seq_len - 2] (a micro-batch "
                f"needs 2 tokens to train one), got {dyn_bsz_margin}"
            )
        if full > MAX_BUDGET:
            raise ValueError(
                f"build_dataloader: micro_batch_size * max_seq_len - dyn_bsz_margin = {full} tokens per packed "
                "micro-batch is more than the packer's 2**24"
            )
        if not 0.0 <= bsz_warmup_ratio < 1.0:
            raise ValueError(f"build_dataloader: bsz_warmup_ratio must be in [0, 1), got {bsz_warmup_ratio}")
        warmup_steps = 0
        if bsz_warmup_ratio > 0:
            if train_steps is None or train_steps < 1:
                raise ValueError(
                    "build_dataloader: bsz_warmup_ratio > 0 needs train_steps (warm-up = ratio * train_steps)"
                )
            warmup_steps = int(bsz_warmup_ratio * train_steps)
        init = _positive_int("bsz_warmup_init_mbtoken", bsz_warmup_init_mbtoken)
        schedule = BudgetSchedule(full, init_tokens=init, warmup_steps=warmup_steps)
        _positive_int("dyn_bsz_buffer_size", dyn_bsz_buffer_size)
    if collate_fn is None:
        if rmpad:
            collate_fn = DataCollatorWithPacking()
        elif rmpad_with_pos_ids:
            collate_fn = DataCollatorWithPositionIDs()
        else:
            collate_fn = DataCollatorWithPadding()
    check_dataset(dataset, dp_size * max(num_workers, 1))
    return DistributedDataloader(
        dataset,
        micro_batch_size=micro_batch_size,
        num_micro_batches=num_micro_batches,
        max_seq_len=max_seq_len,
        seed=seed,
        collate_fn=collate_fn,
        schedule=schedule,
        dyn_bsz_buffer_size=dyn_bsz_buffer_size,
        num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch_factor=prefetch_factor,
        dp_rank=dp_rank,
        dp_size=dp_size,
    )
