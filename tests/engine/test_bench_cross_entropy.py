"""bench/cross_entropy.py: the GEMM-only bound it times computes the loss's three products, chunked or not."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.cross_entropy import loss_gemms  # noqa: E402


@pytest.mark.parametrize("rows", [5, 16, 37])
def test_loss_gemms_match_the_unchunked_products(rows):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(37, 8, generator=gen, dtype=torch.float64)
    w = torch.randn(11, 8, generator=gen, dtype=torch.float64)
    logits = torch.empty(rows, 11, dtype=torch.float64)
    grad_hidden, grad_weight = torch.full_like(x, float("nan")), torch.full_like(w, float("nan"))
    loss_gemms(x, w, logits, grad_hidden, grad_weight)
    full = x @ w.t()
    torch.testing.assert_close(grad_hidden, full @ w)
    torch.testing.assert_close(grad_weight, full.t() @ x)
