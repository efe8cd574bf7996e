"""The Triton dtype conversion (kernels/cast.py, the backward of the per-unit bf16 casts) against ``Tensor.to``:
bit-exact (widening is exact; narrowing rounds to nearest even in both), odd sizes, block edges."""

from __future__ import annotations

import pytest
import torch
from veofast.kernels.cast import cast_contiguous

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# Narrowing is checked on the GPU only: the interpreter's fp32 -> bf16 conversion truncates instead of rounding.
NARROWING = pytest.param(torch.float32, torch.bfloat16, marks=pytest.mark.gpu, id="fp32-bf16")


@pytest.mark.parametrize("numel", [1, 255, 256, 257, 1000])
@pytest.mark.parametrize("src, dst", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32), NARROWING])
def test_cast_matches_torch(numel, src, dst):
    gen = torch.Generator().manual_seed(numel)
    x = (torch.randn(numel, generator=gen) * 3).to(device=DEVICE, dtype=src)
    x[::7] *= 1e-30  # subnormals and values that round away in the narrow dtypes
    got = cast_contiguous(x.view(-1, 1) if numel % 2 else x, dst, block=256)
    assert got.dtype == dst and got.is_contiguous()
    assert torch.equal(got.view(-1), x.to(dst))


def test_cast_rejects_non_contiguous():
    with pytest.raises(ValueError, match="contiguous"):
        cast_contiguous(torch.zeros(4, 4).t(), torch.bfloat16)


def test_cast_empty():
    assert cast_contiguous(torch.zeros(0, 3, device=DEVICE), torch.bfloat16).shape == (0, 3)


@pytest.mark.gpu
def test_gpu_cast_large():
    x = torch.randn(3 * 4096 + 5, 1031, device="cuda", dtype=torch.bfloat16)
    assert torch.equal(cast_contiguous(x, torch.float32), x.float())
