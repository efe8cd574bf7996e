"""Micro-batch formation: which samples go together into one micro-batch (before collation).

- ``FixedBatcher`` (padding): ``micro_batch_size`` samples per micro-batch, each truncated to ``max_seq_len``.
- ``DynamicBatcher`` (rmpad / rmpad_with_pos_ids): samples packed under a token budget.

``DynamicBatcher`` keeps a buffer of ``buffer_size`` samples. When it has no packed micro-batch ready, it
tops the buffer up from the sample stream, packs the whole buffer by best-fit-decreasing
(``veofast.data.packing``), and makes every bin but the emptiest one ready (the emptiest one's samples stay in
the buffer and are packed again with the next samples, so leftovers are not shipped half empty). With one bin
only, that bin is ready. Ready micro-batches are given out in bin order, samples within one in stream order.

Budget: ``budget_at(step)`` tokens for the micro-batches of optimizer step ``step`` (constant outside the
batch-size warm-up). When the budget changes, ready micro-batches packed for the old budget go back to the
buffer. Over-long samples follow one documented rule: a sample longer than ``max_tokens`` (the full budget)
is truncated to it (``input_ids``, ``labels`` and ``position_ids`` if it has them), counted and logged; during
warm-up, a sample longer than the warm-up budget (but not than ``max_tokens``) gets a micro-batch of its own.
A sample that truncation leaves with no trained label after its first token (an SFT answer beyond the cut) is
dropped, counted and logged: it has nothing left to train, and a micro-batch of such samples could not be collated.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import numpy as np

from veofast.data.data_collator import IGNORE_INDEX
from veofast.data.packing import pack_sequences

logger = logging.getLogger(__name__)


class _Truncator:
    """Cuts samples to ``limit`` tokens, counting and logging (first 10, then every 1000th).

    Returns None for a sample left with nothing to train (no label != -100 after its first token), which the
    batchers drop; ``MAX_DROPPED_IN_A_ROW`` such samples in a row mean the limit leaves nothing trainable at all.
    """

    MAX_DROPPED_IN_A_ROW = 1000

    def __init__(self, limit: int, what: str) -> None:
        if limit < 2:
            raise ValueError(f"{what} = {limit}: a sample needs at least 2 tokens to train one")
        self.limit, self.what, self.count, self.dropped, self.dropped_in_a_row = limit, what, 0, 0, 0

    def __call__(self, sample: dict) -> dict | None:
        n = len(sample["input_ids"])
        if n <= self.limit:
            self.dropped_in_a_row = 0
            return sample
        self.count += 1
        if self.count <= 10 or self.count % 1000 == 0:
            logger.warning(
                "truncated a sample of %d tokens to %s = %d (%d truncated so far)", n, self.what, self.limit, self.count
            )
        cut = {key: sample[key][: self.limit] for key in ("input_ids", "labels", "position_ids") if key in sample}
        if not np.any(np.asarray(cut["labels"][1:]) != IGNORE_INDEX):
            return self._drop(n)
        self.dropped_in_a_row = 0
        return {**sample, **cut}

    def _drop(self, n: int) -> None:
        self.dropped += 1
        self.dropped_in_a_row += 1
        if self.dropped <= 10 or self.dropped % 1000 == 0:
            logger.warning(
                "dropped a sample of %d tokens: cut to %s = %d, it has no trained label left (%d dropped so far)",
                n,
                self.what,
                self.limit,
                self.dropped,
            )
        if self.dropped_in_a_row >= self.MAX_DROPPED_IN_A_ROW:
            raise ValueError(
                f"{self.dropped_in_a_row} samples in a row had no trained label within {self.what} = {self.limit} "
                "tokens: raise data.max_seq_len (or micro_batch_size), or lower dyn_bsz_margin"
            )
        return None


class FixedBatcher:
    """``micro_batch_size`` consecutive samples per micro-batch. State: micro-batches given out."""

    def __init__(self, stream: Iterator[dict], *, micro_batch_size: int, max_seq_len: int) -> None:
        self.stream, self.micro_batch_size = stream, micro_batch_size
        self.truncate = _Truncator(max_seq_len, "max_seq_len")
        self.emitted = 0

    def next_micro_batch(self) -> list[dict]:
        samples = []
        while len(samples) < self.micro_batch_size:
            sample = self.truncate(next(self.stream))
            if sample is not None:
                samples.append(sample)
        self.emitted += 1
        return samples

    def state_dict(self) -> dict:
        return {"emitted": self.emitted}

    def load_state_dict(self, state: dict) -> None:
        self.emitted = state["emitted"]


class DynamicBatcher:
    """Packs samples from ``stream`` into micro-batches under a token budget (rules in the module doc).

    Args:
        stream: iterator of samples.
        budget_at: micro-batch number (0, 1, ... of this batcher) -> token budget for it.
        max_tokens: the full budget; longer samples are truncated to it.
        buffer_size: samples packed together (``dyn_bsz_buffer_size``).
        backend: packer backend (``"auto"``, ``"cpp"``, ``"python"``).
    State: ``{"emitted", "buffer", "ready", "ready_budget"}``.
    """

    def __init__(
        self,
        stream: Iterator[dict],
        *,
        budget_at: Callable[[int], int],
        max_tokens: int,
        buffer_size: int,
        backend: str = "auto",
    ) -> None:
        if buffer_size < 1:
            raise ValueError(f"dyn_bsz_buffer_size must be >= 1, got {buffer_size}")
        self.stream, self.budget_at, self.buffer_size, self.backend = stream, budget_at, buffer_size, backend
        self.truncate = _Truncator(max_tokens, "the micro-batch token budget")
        self.emitted = 0
        self.buffer: list[dict] = []
        self.ready: list[list[dict]] = []
        self.ready_budget = 0

    def next_micro_batch(self) -> list[dict]:
        """The samples of the next micro-batch, in stream order."""
        budget = self.budget_at(self.emitted)
        if self.ready and self.ready_budget != budget:  # the warm-up budget moved: pack again
            self.buffer = [s for bin_ in self.ready for s in bin_] + self.buffer
            self.ready = []
        if not self.ready:
            self._pack(budget)
        self.emitted += 1
        return self.ready.pop(0)

    def _pack(self, budget: int) -> None:
        while len(self.buffer) < self.buffer_size:
            sample = self.truncate(next(self.stream))
            if sample is not None:
                self.buffer.append(sample)
        lengths = np.fromiter((min(len(s["input_ids"]), budget) for s in self.buffer), np.int64, len(self.buffer))
        indices, offsets = pack_sequences(lengths, budget, backend=self.backend)
        grouped = [self.buffer[i] for i in indices.tolist()]  # bin by bin, stream order within a bin
        bounds = offsets.tolist()
        bins = [grouped[start:end] for start, end in zip(bounds[:-1], bounds[1:])]
        if len(bins) > 1:
            fills = np.add.reduceat(lengths[indices], offsets[:-1])
            emptiest = len(bins) - 1 - int(np.argmin(fills[::-1]))  # the last opened on a tie
            self.buffer = bins.pop(emptiest)
        else:
            self.buffer = []
        self.ready = bins
        self.ready_budget = budget

    def state_dict(self) -> dict:
        return {
            "emitted": self.emitted,
            "buffer": list(self.buffer),
            "ready": [list(b) for b in self.ready],
            "ready_budget": self.ready_budget,
        }

    def load_state_dict(self, state: dict) -> None:
        self.emitted, self.ready_budget = state["emitted"], state["ready_budget"]
        self.buffer, self.ready = list(state["buffer"]), [list(b) for b in state["ready"]]
