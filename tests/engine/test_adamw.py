"""veofast.optim.AdamW: the Triton step (CPU interpreter here, bf16 copies and timings on the GPU) against
torch.optim.AdamW, its state dict against torch's, and the bf16 compute copies it writes for the forward."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from veofast.distributed.mixed_precision import ComputeCopies, cast_parameters_for_compute, compute_copies_of
from veofast.models.auto import build_foundation_model
from veofast.optim import AdamW, build_optimizer

SHAPES = [(1,), (1000,), (1025,), (37, 53), (3, 5, 7)]
HYPER = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8)


def _params(seed: int = 0) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]


def _groups(params):
    return [{"params": params[:3], "weight_decay": 0.1}, {"params": params[3:], "weight_decay": 0.0}]


def _run(optimizer, params, steps: int, seed: int = 1, lrs=(3e-3, 1e-3, 2e-3, 5e-4)) -> None:
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lrs[step % len(lrs)]  # as a schedule does between steps
        for i, p in enumerate(params):
            # a gradient now and then absent (a frozen branch): the parameter and its state stay as they are
            p.grad = None if (step == 1 and i == 2) else torch.randn(p.shape, generator=gen) * (10.0**-i)
        optimizer.step()


def _assert_close(a, b, rtol=2e-6, atol=1e-7):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def test_triton_step_matches_torch_adamw():
    ours, theirs = _params(), _params()
    opt = AdamW(_groups(ours), **HYPER, backend="triton")
    ref = torch.optim.AdamW(_groups(theirs), **HYPER, foreach=False)
    _run(opt, ours, 4)
    _run(ref, theirs, 4)
    for p, q in zip(ours, theirs, strict=True):
        _assert_close(p.detach(), q.detach())
        for key in ("exp_avg", "exp_avg_sq"):
            _assert_close(opt.state[p][key], ref.state[q][key])
        assert opt.state[p]["step"].device.type == "cpu" and opt.state[p]["step"] == ref.state[q]["step"]


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_grad_scale_scales_the_gradients(backend):
    """step(grad_scale=c) updates as torch does after grad *= c (the Triton step leaves .grad as it is)."""
    ours, theirs = _params(), _params()
    opt = AdamW(_groups(ours), **HYPER, backend=backend)
    ref = torch.optim.AdamW(_groups(theirs), **HYPER, foreach=False)
    gen = torch.Generator().manual_seed(2)
    for scale in (0.25, 1.0, 0.5):
        for p, q in zip(ours, theirs, strict=True):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad * scale
        opt.step(grad_scale=torch.tensor(scale))
        ref.step()
    for p, q in zip(ours, theirs, strict=True):
        _assert_close(p.detach(), q.detach())


def test_state_dict_moves_between_torch_and_veofast():
    """A torch AdamW checkpoint continues in veofast's, and the other way round, as if nothing changed."""
    a, b, c = _params(), _params(), _params()
    ref = torch.optim.AdamW(_groups(a), **HYPER, foreach=False)
    _run(ref, a, 2)
    ours = AdamW(_groups(b), **HYPER, backend="triton")
    with torch.no_grad():
        for p, q in zip(b, a, strict=True):
            p.copy_(q)
    ours.load_state_dict(copy.deepcopy(ref.state_dict()))  # a loaded state shares the saved tensors
    _run(ref, a, 2, seed=5)
    _run(ours, b, 2, seed=5)
    for p, q in zip(b, a, strict=True):
        _assert_close(p.detach(), q.detach())
    back = torch.optim.AdamW(_groups(c), **HYPER, foreach=False)
    back.load_state_dict(copy.deepcopy(ours.state_dict()))
    assert [back.state[p]["step"].item() for p in c] == [ours.state[p]["step"].item() for p in b]


def test_torch_backend_and_options_the_kernel_lacks_use_torch():
    ours, theirs = _params(), _params()
    opt = AdamW(_groups(ours), **HYPER, backend="torch")
    ref = torch.optim.AdamW(_groups(theirs), **HYPER)
    _run(opt, ours, 3)
    _run(ref, theirs, 3)
    for p, q in zip(ours, theirs, strict=True):
        assert torch.equal(p, q)
    amsgrad = _params()
    opt = AdamW(_groups(amsgrad), **HYPER, backend="triton")
    opt.param_groups[0]["amsgrad"] = True  # torch's implementation runs that group
    _run(opt, amsgrad, 1)
    assert "max_exp_avg_sq" in opt.state[amsgrad[0]] and "max_exp_avg_sq" not in opt.state[amsgrad[4]]


def _special_values(device) -> torch.Tensor:
    """Random fp32 values plus ties between two bf16 numbers, their neighbours, the largest floats, inf and nan."""
    ties = (torch.arange(1, 200, dtype=torch.int32) << 16 | 0x8000).view(torch.float32)
    near = torch.cat([(ties.view(torch.int32) + d).view(torch.float32) for d in (-1, 1)])
    extremes = torch.tensor([3.4028e38, -3.4028e38, 3.3e38, float("inf"), -float("inf"), float("nan"), 0.0, -0.0])
    return torch.cat([torch.randn(3001, generator=torch.Generator().manual_seed(0)), ties, -ties, near, extremes]).to(
        device
    )


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_compute_copy_rounds_like_a_torch_cast(device):
    """lr = 0 and zero gradients leave the parameter as it is: its copy must be torch's bf16 cast of it, bit for bit."""
    from veofast.kernels.adamw import adamw_update_

    param = _special_values(device)
    copy_ = torch.empty_like(param, dtype=torch.bfloat16)
    zeros = [torch.zeros_like(param) for _ in range(3)]
    adamw_update_(param, *zeros, lr=0.0, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0, step=1, compute_copy=copy_)
    want = param.to(torch.bfloat16)
    assert torch.equal(copy_.view(torch.int16)[~want.isnan()], want.view(torch.int16)[~want.isnan()])
    assert torch.equal(copy_.isnan(), want.isnan())


@pytest.mark.gpu
def test_gpu_step_and_copies_match_torch():
    """On the GPU: a model-sized mix of tensors, several steps against torch's AdamW; copies equal torch's casts."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(4096, 1000), (1 << 20,), (2048,), (3, 1001)]
    ours = [nn.Parameter(torch.randn(s, device="cuda", generator=gen)) for s in shapes]
    theirs = [nn.Parameter(p.detach().clone()) for p in ours]
    copies = ComputeCopies(torch.bfloat16)
    for p in ours:
        copies.register(p)
    opt = AdamW(_groups(ours), **HYPER, backend="triton", compute_copies=copies)
    ref = torch.optim.AdamW(_groups(theirs), **HYPER, foreach=False)
    for _ in range(3):
        for p, q in zip(ours, theirs, strict=True):
            p.grad = torch.randn(p.shape, device="cuda", generator=gen)
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
    for p, q in zip(ours, theirs, strict=True):
        _assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
        assert torch.equal(copies.fresh(p), p.detach().to(torch.bfloat16))


def test_bad_backend_is_refused():
    with pytest.raises(ValueError, match="backend"):
        AdamW(_params(), backend="cuda")


TINY = {
    "model_type": "llama",
    "vocab_size": 97,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "tie_word_embeddings": True,
}


def _tiny_model():
    model = build_foundation_model(config_overrides=TINY, init_device="cpu", ops_backend="torch")
    cast_parameters_for_compute(model, list(model.model.layers), torch.bfloat16)
    return model


def _batch():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 97, (1, 24), generator=gen)
    cu = torch.tensor([0, 11, 24], dtype=torch.int32)
    positions = torch.cat([torch.arange(11), torch.arange(13)])[None]
    return {"input_ids": ids, "labels": ids.clone(), "position_ids": positions, "cu_seqlens": cu, "max_seqlen": 13}


def _train_step(model, optimizer, batch) -> torch.Tensor:
    loss = model(**batch).lm_loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def test_compute_copies_stand_in_for_the_casts():
    """With the copies the optimizer writes, training computes exactly what it computes with casts."""
    batch = _batch()
    with_copies = _tiny_model()
    casting = copy.deepcopy(with_copies)
    opt = build_optimizer(with_copies, lr=1e-2, weight_decay=0.1, backend="triton")
    assert opt.compute_copies is compute_copies_of(with_copies)
    ref = build_optimizer(casting, lr=1e-2, weight_decay=0.1, backend="triton")
    ref.compute_copies = None
    for _ in range(3):
        assert torch.equal(_train_step(with_copies, opt, batch), _train_step(casting, ref, batch))
    copies = opt.compute_copies
    weight = with_copies.model.layers[0].mlp.up_proj.weight
    assert torch.equal(copies.fresh(weight), weight.detach().to(torch.bfloat16))


def test_compute_copies_can_be_turned_off():
    model = _tiny_model()
    opt = build_optimizer(model, lr=1e-2, backend="triton", keep_compute_copies=False)
    _train_step(model, opt, _batch())
    assert opt.compute_copies is None
    assert compute_copies_of(model).fresh(model.model.layers[0].mlp.up_proj.weight) is None


def test_forward_uses_a_fresh_copy_and_casts_after_a_change():
    model = _tiny_model()
    opt = build_optimizer(model, lr=1e-2, backend="triton")
    batch = _batch()
    _train_step(model, opt, batch)
    weight = model.model.layers[1].self_attn.o_proj.weight
    copies = compute_copies_of(model)
    with torch.no_grad():
        base = model(**batch).lm_loss
        copies.fresh(weight).zero_()  # the forward reads the copy, not the parameter
        assert not torch.equal(model(**batch).lm_loss, base)
        weight.mul_(1.0)  # an in-place change through torch: the copy is stale, the forward casts again
        assert copies.fresh(weight) is None
        assert torch.equal(model(**batch).lm_loss, base)
        copies.target(weight).zero_()
        copies.written(weight)
        copies.invalidate()
        assert torch.equal(model(**batch).lm_loss, base)
        copies.written(weight)
        weight.data = weight.data.clone()  # new storage, same version: stale too
        assert copies.fresh(weight) is None and torch.equal(model(**batch).lm_loss, base)
