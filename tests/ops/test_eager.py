"""veofast.ops._eager: plain eager calls skip the dispatcher and give what the custom op gives; everything else (fake
tensors, dispatch modes, tensor subclasses, torch.compile) goes through the custom op."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from veofast.ops import _eager
from veofast.ops.norm import rms_norm
from veofast.ops.rope import apply_rotary
from veofast.ops.swiglu import swiglu


def _calls(seed: int) -> dict:
    """Outputs and input gradients of the Triton paths (interpreter on CPU) of the eager-wrapped ops, odd shapes."""
    gen = torch.Generator().manual_seed(seed)
    x, res, gate, up = (torch.randn(5, 37, generator=gen, requires_grad=True) for _ in range(4))
    weight = torch.randn(37, generator=gen, requires_grad=True)
    q, k = torch.randn(7, 3, 16, generator=gen), torch.randn(7, 1, 16, generator=gen)
    q.requires_grad_(), k.requires_grad_()
    positions = torch.tensor([0, 1, 2, 0, 1, 0, 3])
    inv_freq = 1.0 / 10000 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16)
    y, h = rms_norm(x, weight, 1e-6, residual=res, backend="triton")
    out = {"y": y, "h": h, "swiglu": swiglu(gate, up, backend="triton")}
    out["q"], out["k"] = apply_rotary(q, k, positions, inv_freq, backend="triton")
    out["q_"], out["k_"] = apply_rotary(q * 2, k * 2, positions, inv_freq, inplace=True, backend="triton")
    loss = sum((t * torch.linspace(-1, 1, t.numel()).view_as(t)).sum() for t in out.values())
    leaves = {"x": x, "res": res, "weight": weight, "gate": gate, "up": up, "dq": q, "dk": k}
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return {**{n: t.detach() for n, t in out.items()}, **dict(zip(leaves, grads, strict=True))}


def test_eager_path_matches_custom_op_path(monkeypatch):
    calls = []
    real = _eager._plain_eager

    def spy(args):
        calls.append(real(args))
        return calls[-1]

    monkeypatch.setattr(_eager, "_plain_eager", spy)
    eager = _calls(seed=3)
    assert calls and all(calls), "plain CPU tensors must take the eager path"
    monkeypatch.setattr(_eager, "_plain_eager", lambda args: False)
    through_op = _calls(seed=3)
    for name, value in eager.items():
        torch.testing.assert_close(value, through_op[name], rtol=0, atol=0, msg=name)


def test_fake_tensors_go_through_the_custom_op():
    """Under FakeTensorMode the op's fake implementation answers: no kernel runs on a fake tensor."""
    with FakeTensorMode():
        gate, up = torch.empty(4, 3, 24), torch.empty(4, 3, 24)
        assert not _eager._plain_eager((gate, up))
        y = swiglu(gate, up, backend="triton")
    assert y.shape == (4, 3, 24)


def test_meta_tensors_go_through_the_custom_op():
    gate, up = torch.empty(4, 24, device="meta"), torch.empty(4, 24, device="meta")
    assert not _eager._plain_eager((gate, up))
    y = swiglu(gate, up, backend="triton")
    assert y.shape == (4, 24) and y.is_meta


@pytest.mark.parametrize("wrap", [torch.nn.Parameter, lambda t: t])
def test_plain_tensors_and_parameters_are_eager(wrap):
    assert _eager._plain_eager((wrap(torch.ones(2)), 1.0, None))


def test_subclass_is_not_eager():
    class Tagged(torch.Tensor):
        pass

    assert not _eager._plain_eager((torch.ones(2).as_subclass(Tagged),))
