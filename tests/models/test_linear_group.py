"""``linear_group``: the same outputs and gradients as calling each ``nn.Linear`` on the shared input."""

import copy

import pytest
import torch
from torch import nn

from veofast.models.linear_group import Linear, linear_group


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


def _cast_pair(device: str, bias: bool):
    """fp32 Linear modules computing in bf16, and copies held in bf16."""
    torch.manual_seed(3)
    masters = [Linear(40, n, bias=bias, device=device) for n in (24, 8)]
    held = [copy.deepcopy(m).to(torch.bfloat16) for m in masters]
    for m in masters:
        m.compute_dtype = torch.bfloat16
    return masters, held


@pytest.mark.parametrize("bias", [False, True])
def test_compute_dtype_casts_inside_and_returns_gradients_in_the_parameters_dtype(bias):
    """CPU: the same bits as the modules held in bf16, gradients in fp32."""
    masters, held = _cast_pair("cpu", bias)
    x = torch.randn(33, 40, dtype=torch.bfloat16)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    got = linear_group(xs[0], masters)
    ref = linear_group(xs[1], held)
    for y, r in zip(got, ref, strict=True):
        assert y.dtype == torch.bfloat16 and torch.equal(y, r)
    seed = [torch.randn_like(y) for y in got]
    torch.autograd.backward(got, seed)
    torch.autograd.backward(ref, seed)
    assert torch.equal(xs[0].grad, xs[1].grad)
    for m, h in zip(masters, held, strict=True):
        for p, q in zip(m.parameters(), h.parameters(), strict=True):
            assert p.dtype == p.grad.dtype == torch.float32
            assert torch.equal(p.grad, q.grad.float())


def test_compute_dtype_mismatches_raise():
    masters, _ = _cast_pair("cpu", False)
    with pytest.raises(ValueError, match="the input is torch.float32"):
        linear_group(torch.randn(3, 40), masters)
    masters[1].compute_dtype = None
    with pytest.raises(ValueError, match="different compute dtypes"):
        linear_group(torch.randn(3, 40, dtype=torch.bfloat16), masters)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_fp32_weight_gradients_from_the_gemm():
    """CUDA: weight gradients come out of the GEMM in fp32, closer to float64 than the bf16 gradient of the
    modules held in bf16; outputs and input gradients are those bits."""
    masters, held = _cast_pair("cuda", True)
    x = torch.randn(4097, 40, device="cuda", dtype=torch.bfloat16)
    seed = [torch.randn(4097, m.out_features, device="cuda", dtype=torch.bfloat16) for m in masters]
    got = linear_group(x, masters)
    ref = linear_group(x, held)
    assert all(torch.equal(y, r) for y, r in zip(got, ref, strict=True))
    torch.autograd.backward(got, seed)
    torch.autograd.backward(ref, seed)
    for m, h, g in zip(masters, held, seed, strict=True):
        exact = g.double().t() @ x.double()
        err = (m.weight.grad.double() - exact).abs().max()
        err_bf16 = (h.weight.grad.double() - exact).abs().max()
        assert m.weight.grad.dtype == torch.float32 and err <= 0.5 * err_bf16, (err, err_bf16)
