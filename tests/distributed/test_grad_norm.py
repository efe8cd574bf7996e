"""Gradient clipping (``veofast.distributed.grad_norm``) on a plain module: the norm and the factor it gives, and
non-finite norms that leave the gradients as they are (the training step then skips the update); on two ranks,
a gradient missing on one rank or non-finite on one rank only."""

import json

import pytest
import torch
from dist_launch import torchrun
from torch import nn

from veofast.distributed.grad_norm import clip_coefficient, clip_grad_norm

WORKER = "tests/distributed/workers/grad_norm_worker.py"


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


def test_ranks_with_missing_or_non_finite_gradients_agree(tmp_path):
    """A rank without a gradient for a sharded parameter still joins its reduction (it used to skip it, and its
    peer failed in the all-reduce it ran alone); an inf on one rank gives every rank an infinite norm (all skip)."""
    torchrun(WORKER, str(tmp_path), nproc=2, timeout=60)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    # missing: norm 5 on both; clipped by 1/5: rank 0 holds [3, 0] and [0, 4], rank 1 only [0, 4]
    assert [r["missing"] for r in reports] == [pytest.approx([5.0, 1.4]), pytest.approx([5.0, 0.8])]
    # inf on rank 1 only: both see an infinite norm and leave their gradients unscaled
    assert [r["inf_on_one"] for r in reports] == [[float("inf"), 7.0], [float("inf"), float("inf")]]
