"""Collators: a list of samples -> one micro-batch of tensors, computed on the host once.

Samples are ``{"input_ids", "labels"}`` (lists or 1-D int arrays, labels unshifted with -100 where nothing is
trained); other keys are ignored except ``position_ids`` for ``DataCollatorWithPositionIDs``.

- ``DataCollatorWithPadding`` (neither rmpad flag): ``input_ids``/``labels``/``attention_mask``/``position_ids``
  ``(B, L)``, right-padded (``pad_token_id``, label -100, mask 0), and ``num_label_tokens``.
- ``DataCollatorWithPacking`` (``rmpad``): the samples end to end as one row, each sample one document:
  ``input_ids (1, T)``, ``labels (1, T)``, ``position_ids (1, T)`` restarting at 0 per document,
  ``cu_seqlens (docs + 1,) int32``, ``max_seqlen: int``, ``num_label_tokens: int``.
- ``DataCollatorWithPositionIDs`` (``rmpad_with_pos_ids``): the same micro-batch, but the documents are where
  ``position_ids`` restart at 0, taken from the samples when they carry ``position_ids`` (samples that were
  packed beforehand) and ``0..len-1`` per sample otherwise.

Every collator sets the label of each document's first token (each row's first, when padded) to -100: the
model shifts labels by one, so that label would be predicted from the previous document (or from nothing).
``num_label_tokens`` is then exactly the number of trained positions. A micro-batch with no trained position
raises ``ValueError`` rather than yield a silent zero loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

IGNORE_INDEX = -100


def _arrays(features: Sequence[dict], name: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    if not features:
        raise ValueError(f"{name}: got an empty list of samples")
    input_ids, labels = [], []
    for i, feature in enumerate(features):
        ids = np.asarray(feature["input_ids"], dtype=np.int64)
        lab = np.asarray(feature["labels"], dtype=np.int64)
        if ids.ndim != 1 or ids.shape != lab.shape or ids.size == 0:
            raise ValueError(
                f"{name}: sample {i} needs 1-D input_ids and labels of the same non-zero length, "
                f"got shapes {ids.shape} and {lab.shape}"
            )
        input_ids.append(ids)
        labels.append(lab)
    return input_ids, labels


def _count_labels(labels: np.ndarray, name: str) -> int:
    count = int(np.count_nonzero(labels != IGNORE_INDEX))
    if count == 0:
        raise ValueError(f"{name}: the micro-batch has no trainable label (every label is -100)")
    return count


class DataCollatorWithPadding:
    """Pads samples on the right to the longest one. ``pad_token_id`` fills ``input_ids`` where
    ``attention_mask`` is 0 (its value does not matter: those positions are masked and not trained)."""

    def __init__(self, pad_token_id: int = 0) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, features: Sequence[dict]) -> dict:
        """features: B samples -> ``input_ids``, ``labels``, ``attention_mask``, ``position_ids`` (B, L) int64,
        ``num_label_tokens``."""
        input_ids, labels = _arrays(features, type(self).__name__)
        batch, length = len(features), max(len(x) for x in input_ids)
        ids = np.full((batch, length), self.pad_token_id, dtype=np.int64)
        lab = np.full((batch, length), IGNORE_INDEX, dtype=np.int64)
        mask = np.zeros((batch, length), dtype=np.int64)
        for row, (x, y) in enumerate(zip(input_ids, labels, strict=True)):
            ids[row, : len(x)], lab[row, 1 : len(y)], mask[row, : len(x)] = x, y[1:], 1
        return {
            "input_ids": torch.from_numpy(ids),
            "labels": torch.from_numpy(lab),
            "attention_mask": torch.from_numpy(mask),
            "position_ids": torch.arange(length, dtype=torch.int64).expand(batch, length).contiguous(),
            "num_label_tokens": _count_labels(lab, type(self).__name__),
        }


def pack_documents(input_ids: np.ndarray, labels: np.ndarray, starts: np.ndarray, name: str) -> dict:
    """The packed micro-batch of documents beginning at ``starts`` (sorted, ``starts[0] == 0``).

    input_ids, labels: (T,) int64 (labels copied, then masked at every start).
    """
    labels = labels.copy()
    labels[starts] = IGNORE_INDEX
    total = input_ids.shape[0]
    cu_seqlens = np.append(starts, total).astype(np.int32)
    doc_lengths = np.diff(cu_seqlens)
    position_ids = np.arange(total, dtype=np.int64) - np.repeat(starts.astype(np.int64), doc_lengths)
    return {
        "input_ids": torch.from_numpy(input_ids).unsqueeze(0),
        "labels": torch.from_numpy(labels).unsqueeze(0),
        "position_ids": torch.from_numpy(position_ids).unsqueeze(0),
        "cu_seqlens": torch.from_numpy(cu_seqlens),
        "max_seqlen": int(doc_lengths.max()),
        "num_label_tokens": _count_labels(labels, name),
    }


class DataCollatorWithPacking:
    """Concatenates samples into one row (``rmpad``); every sample is one document."""

    def __call__(self, features: Sequence[dict]) -> dict:
        """features: samples of lengths l_i -> the packed micro-batch with T = sum(l_i) (see the module doc)."""
        input_ids, labels = _arrays(features, type(self).__name__)
        lengths = np.fromiter((len(x) for x in input_ids), dtype=np.int64, count=len(input_ids))
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        return pack_documents(np.concatenate(input_ids), np.concatenate(labels), starts, type(self).__name__)


class DataCollatorWithPositionIDs:
    """Concatenates samples into one row (``rmpad_with_pos_ids``); documents start where position_ids are 0."""

    def __call__(self, features: Sequence[dict]) -> dict:
        """features: samples, optionally with ``position_ids`` (same length, 0 at each document start) -> the
        packed micro-batch (see the module doc)."""
        name = type(self).__name__
        input_ids, labels = _arrays(features, name)
        positions = []
        for i, (feature, ids) in enumerate(zip(features, input_ids, strict=True)):
            if "position_ids" in feature:
                pos = np.asarray(feature["position_ids"], dtype=np.int64)
                if pos.shape != ids.shape or pos[0] != 0:
                    raise ValueError(f"{name}: sample {i} position_ids must match input_ids and start at 0")
            else:
                pos = np.arange(len(ids), dtype=np.int64)
            positions.append(pos)
        starts = np.flatnonzero(np.concatenate(positions) == 0)
        return pack_documents(np.concatenate(input_ids), np.concatenate(labels), starts, name)
