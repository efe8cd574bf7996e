"""Second-order gradients through the public ops: an op whose backward is a kernel (or, for the cross-entropy, made
in the forward pass) raises when differentiated twice, instead of silently leaving its contribution out of a
gradient penalty; rotary, whose backward is the op itself, gives the reference's second-order gradient."""

import pytest
import torch

from veofast.ops import (
    apply_rotary,
    fused_linear_cross_entropy,
    moe_ffn,
    rms_norm,
    swiglu,
    varlen_attention,
)


def _attention(x: torch.Tensor, backend: str) -> torch.Tensor:
    q = x.view(6, 2, 16)
    cu = torch.tensor([0, 4, 6], dtype=torch.int32)
    return varlen_attention(q, q, q, cu, cu, 4, 4, backend=backend)


def _moe(x: torch.Tensor, backend: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    ids = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 2], [1, 0], [2, 1]])
    gate_up, down = torch.randn(3, 8, 32, generator=gen), torch.randn(3, 32, 4, generator=gen)
    return moe_ffn(x, ids, torch.full((6, 2), 0.5), gate_up, down, backend=backend)


def _cross_entropy(x: torch.Tensor, backend: str) -> torch.Tensor:
    weight = torch.randn(11, 32, generator=torch.Generator().manual_seed(1))
    return fused_linear_cross_entropy(x, weight, torch.arange(6), backend=backend)


# name -> (op of a (6, 32) fp32 tensor and a backend name, backends whose second order must raise)
OPS = {
    "rms_norm": (lambda x, b: rms_norm(x, torch.linspace(0.5, 1.5, 32), 1e-6, backend=b), ["triton"]),
    "add_rms_norm": (lambda x, b: rms_norm(x, torch.ones(32), 1e-6, residual=x.flip(0), backend=b)[0], ["triton"]),
    "swiglu": (lambda x, b: swiglu(x, x.flip(1), backend=b), ["triton"]),
    "varlen_attention": (_attention, ["triton"]),
    "moe_ffn": (_moe, ["triton"]),
    "fused_linear_cross_entropy": (_cross_entropy, ["torch", "triton"]),
}


def _penalty_grad(op, backend: str, x: torch.Tensor) -> torch.Tensor:
    """d/dx of ``|d(sum of op(x)**2)/dx|**2 + |x|**2`` (a gradient penalty next to another term); x: (6, 32)."""
    leaf = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(op(leaf, backend).pow(2).sum(), leaf, create_graph=True)
    (second,) = torch.autograd.grad(grad.pow(2).sum() + leaf.pow(2).sum(), leaf)
    return second


@pytest.mark.parametrize("name", list(OPS))
def test_second_order_raises(name):
    op, backends = OPS[name]
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(0))
    for backend in backends:
        with pytest.raises(RuntimeError, match="second-order gradients are not supported"):
            _penalty_grad(op, backend, x)


def test_rotary_second_order_matches_reference():
    gen = torch.Generator().manual_seed(0)
    x, k = torch.randn(6, 32, generator=gen), torch.randn(6, 1, 16, generator=gen)
    inv_freq = torch.rand(8, generator=gen)

    def op(leaf, backend):
        q_out, k_out = apply_rotary(leaf.view(6, 2, 16), k, torch.arange(6), inv_freq, backend=backend)
        return q_out * k_out

    torch.testing.assert_close(_penalty_grad(op, "triton", x), _penalty_grad(op, "torch", x))
