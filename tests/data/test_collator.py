"""Collators on hand-computed examples."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from veofast.data.data_collator import DataCollatorWithPacking, DataCollatorWithPadding, DataCollatorWithPositionIDs

X = -100
SAMPLES = [
    {"input_ids": [11, 12, 13], "labels": [11, 12, 13]},
    {"input_ids": [21, 22], "labels": [X, 22]},
    {"input_ids": np.array([31, 32, 33, 34]), "labels": np.array([X, X, 33, 34]), "other": "ignored"},
]


@pytest.mark.parametrize("collator", [DataCollatorWithPacking(), DataCollatorWithPositionIDs()])
def test_packing(collator):
    out = collator(SAMPLES)
    assert set(out) == {"input_ids", "labels", "position_ids", "cu_seqlens", "max_seqlen", "num_label_tokens"}
    assert out["input_ids"].tolist() == [[11, 12, 13, 21, 22, 31, 32, 33, 34]]
    assert out["labels"].tolist() == [[X, 12, 13, X, 22, X, X, 33, 34]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    assert out["cu_seqlens"].tolist() == [0, 3, 5, 9]
    assert out["cu_seqlens"].dtype == torch.int32
    for key in ("input_ids", "labels", "position_ids"):
        assert out[key].dtype == torch.int64 and out[key].shape == (1, 9)
    assert out["max_seqlen"] == 4 and out["num_label_tokens"] == 5
    assert SAMPLES[0]["labels"] == [11, 12, 13]  # inputs are not modified


def test_position_ids_from_prepacked_samples():
    sample = {"input_ids": [1, 2, 3, 4, 5], "labels": [1, 2, 3, 4, 5], "position_ids": [0, 1, 0, 1, 2]}
    out = DataCollatorWithPositionIDs()([sample, {"input_ids": [6, 7], "labels": [6, 7]}])
    assert out["cu_seqlens"].tolist() == [0, 2, 5, 7]
    assert out["labels"].tolist() == [[X, 2, X, 4, 5, X, 7]]
    assert out["position_ids"].tolist() == [[0, 1, 0, 1, 2, 0, 1]]
    assert out["max_seqlen"] == 3 and out["num_label_tokens"] == 4


def test_padding():
    out = DataCollatorWithPadding(pad_token_id=0)(SAMPLES)
    assert out["input_ids"].tolist() == [[11, 12, 13, 0], [21, 22, 0, 0], [31, 32, 33, 34]]
    assert out["labels"].tolist() == [[X, 12, 13, X], [X, 22, X, X], [X, X, 33, 34]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 3]] * 3
    assert out["num_label_tokens"] == 5
    assert "cu_seqlens" not in out


@pytest.mark.parametrize(
    "collator", [DataCollatorWithPacking(), DataCollatorWithPositionIDs(), DataCollatorWithPadding()]
)
def test_errors(collator):
    with pytest.raises(ValueError, match="no trainable label"):
        collator([{"input_ids": [1, 2], "labels": [X, X]}, {"input_ids": [3], "labels": [3]}])
    with pytest.raises(ValueError, match="empty list"):
        collator([])
    with pytest.raises(ValueError, match="sample 1"):
        collator([{"input_ids": [1, 2], "labels": [1, 2]}, {"input_ids": [1, 2], "labels": [1]}])
