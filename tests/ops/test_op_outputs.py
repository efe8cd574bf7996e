"""Outputs of the ops' Triton paths are ordinary tensors, not autograd views: a caller may modify them in place (the
models rotate the qk-norm outputs in place) and gradients stay right, or, for an output the op saved for its
backward, autograd's version check raises, as for torch's own ops; never silently wrong gradients."""

import pytest
import torch

from veofast.ops import apply_rotary, rms_norm, swiglu, varlen_attention


def _attention(x, head_dim=16):
    q = x.view(6, 32 // head_dim, head_dim)
    cu = torch.tensor([0, 4, 6], dtype=torch.int32)
    return varlen_attention(q, q, q, cu, cu, 4, 4, backend="triton").view(6, 32)


# name -> (op of a (6, 32) fp32 tensor returning a (6, 32) output, whether the op saves that output for backward)
OPS = {
    "rms_norm 2-D": (lambda x: rms_norm(x, torch.ones(32), 1e-6, backend="triton"), False),
    "rms_norm 3-D": (lambda x: rms_norm(x.view(6, 2, 16), torch.ones(16), 1e-6, backend="triton").view(6, 32), False),
    "add_rms_norm y": (lambda x: rms_norm(x, torch.ones(32), 1e-6, residual=x * 2, backend="triton")[0], False),
    "add_rms_norm h": (lambda x: rms_norm(x, torch.ones(32), 1e-6, residual=x * 2, backend="triton")[1], True),
    "swiglu 3-D": (lambda x: swiglu(x.view(2, 3, 32), x.view(2, 3, 32) + 1, backend="triton").view(6, 32), False),
    "rotary": (
        lambda x: apply_rotary(
            x.view(6, 2, 16), x.view(6, 2, 16)[:, :1], torch.arange(6), torch.ones(8), backend="triton"
        )[0].reshape(6, 32),
        False,
    ),
    "varlen_attention": (_attention, True),
    # head dim 8 runs zero-padded to the kernels' 16: the output is a copy of the padded one's columns
    "varlen_attention padded": (lambda x: _attention(x, head_dim=8), False),
}


@pytest.mark.parametrize("name", list(OPS))
def test_output_modified_in_place(name):
    op, saved = OPS[name]
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(0))
    weights = torch.randn(6, 32, generator=torch.Generator().manual_seed(1))

    def loss(inplace: bool, leaf: torch.Tensor) -> torch.Tensor:
        y = op(leaf * 1.0)
        y = y.mul_(3.0) if inplace else y * 3.0
        return (y * weights).sum()

    leaf = x.clone().requires_grad_()
    (want,) = torch.autograd.grad(loss(False, leaf), leaf)
    if saved:
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            torch.autograd.grad(loss(True, leaf), leaf)
    else:
        (got,) = torch.autograd.grad(loss(True, leaf), leaf)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
