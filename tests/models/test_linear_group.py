"""``linear_group``: the same outputs and gradients as calling each ``nn.Linear`` on the shared input."""

import pytest
import torch
from torch import nn

from veofast.models.linear_group import linear_group


def _linears(in_features: int, outs: list[int], bias: bool) -> list[nn.Linear]:
    return [nn.Linear(in_features, n, bias=bias, dtype=torch.float64) for n in outs]


def _grads(linears: list[nn.Linear], x: torch.Tensor) -> list[torch.Tensor]:
    return [x.grad] + [p.grad for m in linears for p in m.parameters()]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(37, 19), (3, 5, 19)])
def test_matches_separate_linears(bias, shape):
    torch.manual_seed(0)
    linears = _linears(19, [23, 7, 7], bias)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    weights = [torch.randn(*shape[:-1], m.out_features, dtype=torch.float64) for m in linears]

    outputs = linear_group(x, linears)
    sum((y * w).sum() for y, w in zip(outputs, weights)).backward()
    got = [y.detach() for y in outputs], _grads(linears, x)

    x.grad = None
    for m in linears:
        m.zero_grad(set_to_none=True)
    expected_outputs = [m(x) for m in linears]
    sum((y * w).sum() for y, w in zip(expected_outputs, weights)).backward()

    for y, ref in zip(got[0], expected_outputs):
        assert y.shape == ref.shape
        torch.testing.assert_close(y, ref.detach(), rtol=1e-12, atol=1e-12)
    for g, ref in zip(got[1], _grads(linears, x), strict=True):
        torch.testing.assert_close(g, ref, rtol=1e-12, atol=1e-12)


def test_unused_output_and_frozen_parts():
    """An output that takes no part in the loss contributes nothing; frozen weights and inputs get no gradient."""
    torch.manual_seed(1)
    linears = _linears(11, [5, 6], bias=True)
    linears[1].weight.requires_grad_(False)
    x = torch.randn(9, 11, dtype=torch.float64)
    first, _ = linear_group(x, linears)
    first.sum().backward()
    assert x.grad is None and linears[1].weight.grad is None
    torch.testing.assert_close(linears[0].weight.grad, x.sum(0).expand(5, 11))
    torch.testing.assert_close(linears[1].bias.grad, torch.zeros(6, dtype=torch.float64))


def test_autocast_calls_each_linear():
    torch.manual_seed(2)
    linears = [nn.Linear(8, 4), nn.Linear(8, 3)]
    x = torch.randn(5, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = linear_group(x, linears)
        expected = [m(x) for m in linears]
    for y, ref in zip(outputs, expected, strict=True):
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y, ref)


def test_needs_a_linear():
    with pytest.raises(ValueError, match="at least one"):
        linear_group(torch.randn(2, 3), [])
