"""Gradient clipping (``veofast.distributed.grad_norm``) on a plain module: the norm and the factor it gives, and
non-finite norms that leave the gradients as they are (the training step then skips the update)."""

import pytest
import torch
from torch import nn

from veofast.distributed.grad_norm import clip_coefficient, clip_grad_norm


def model_with_grads(*grads: list[float]) -> nn.Module:
    """A module whose parameters ``(n_i,)`` hold the given gradients."""
    model = nn.Module()
    model.params = nn.ParameterList(nn.Parameter(torch.zeros(len(g))) for g in grads)
    for param, grad in zip(model.params, grads, strict=True):
        param.grad = torch.tensor(grad)
    return model


def test_finite_norm_is_clipped_to_max_norm():
    model = model_with_grads([3.0, 0.0], [4.0])
    norm = clip_grad_norm(model, 1.0)
    assert norm.item() == pytest.approx(5.0)
    clipped = torch.cat([p.grad for p in model.params])
    assert torch.linalg.vector_norm(clipped).item() == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_norm_leaves_gradients_untouched(bad):
    model = model_with_grads([bad, 2.0], [4.0])
    norm = clip_grad_norm(model, 1.0)
    assert not torch.isfinite(norm)
    assert clip_coefficient(norm, 1.0).item() == 1.0
    grads = torch.cat([p.grad for p in model.params])
    torch.testing.assert_close(grads, torch.tensor([bad, 2.0, 4.0]), equal_nan=True)
