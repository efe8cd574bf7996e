"""veofast.optim.AdamW: the Triton step (CPU interpreter here, bf16 on the GPU) against torch.optim.AdamW, its
gradient scale, and its state dict against torch's."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from veofast.optim import AdamW

SHAPES = [(1,), (1000,), (1025,), (37, 53), (3, 5, 7), (4097,)]
HYPER = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8)


def _params(seed: int = 0, dtype: torch.dtype = torch.float32) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in SHAPES]


def _groups(params):
    return [{"params": params[:3], "weight_decay": 0.1}, {"params": params[3:], "weight_decay": 0.0}]


def _run(optimizer, params, steps: int, seed: int = 1, lrs=(3e-3, 1e-3, 2e-3, 5e-4)) -> None:
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lrs[step % len(lrs)]  # as a schedule does between steps
        for i, p in enumerate(params):
            # a gradient now and then absent (a frozen branch): the parameter and its state stay as they are
            p.grad = None if (step == 1 and i == 2) else torch.randn(p.shape, generator=gen, dtype=p.dtype) * (10.0**-i)
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


def test_half_precision_parameters_update_in_fp32_math():
    """fp16 parameters (their moments fp16 too, as torch keeps them): the update, computed in fp32 and rounded once,
    stays within fp16 rounding of an fp32 run."""
    ours = [nn.Parameter(p.detach().half()) for p in _params()]
    theirs = _params()
    opt = AdamW(_groups(ours), **HYPER, backend="triton")
    ref = torch.optim.AdamW(_groups(theirs), **HYPER, foreach=False)
    gen = torch.Generator().manual_seed(4)
    for _ in range(3):
        for p, q in zip(ours, theirs, strict=True):
            q.grad = torch.randn(q.shape, generator=gen)
            p.grad = q.grad.half()
        opt.step()
        ref.step()
    for p, q in zip(ours, theirs, strict=True):
        assert p.dtype == opt.state[p]["exp_avg"].dtype == torch.float16
        torch.testing.assert_close(p.detach().float(), q.detach(), rtol=2e-3, atol=2e-3)


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
        opt.step(grad_scale=torch.tensor(scale) if scale != 0.5 else torch.tensor([scale]))  # 0-dim or 1-element
        ref.step()
    for p, q in zip(ours, theirs, strict=True):
        _assert_close(p.detach(), q.detach())


def _resumed_from(ref: torch.optim.Optimizer, ref_params: list, params: list) -> AdamW:
    """veofast's Triton AdamW over ``params``, set to ``ref_params``' values and ``ref``'s state, as a resume would."""
    ours = AdamW(_groups(params), **HYPER, backend="triton")
    with torch.no_grad():
        for p, q in zip(params, ref_params, strict=True):
            p.copy_(q)
    ours.load_state_dict(copy.deepcopy(ref.state_dict()))  # a loaded state shares the saved tensors
    return ours


def test_state_dict_moves_between_torch_and_veofast():
    """A torch AdamW checkpoint continues in veofast's, and the other way round, as if nothing changed."""
    a, b, c = _params(), _params(), _params()
    ref = torch.optim.AdamW(_groups(a), **HYPER, foreach=False)
    _run(ref, a, 2)
    ours = _resumed_from(ref, a, b)
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


@pytest.mark.parametrize(
    "options, dtype",
    [
        ({"amsgrad": True}, torch.float32),
        ({"maximize": True}, torch.float32),
        ({"betas": (torch.tensor(0.9), torch.tensor(0.95))}, torch.float32),
        ({}, torch.float64),
    ],
)
def test_what_the_kernel_lacks_takes_torchs_step(options, dtype):
    """amsgrad, maximize, tensor betas and float64 parameters (the kernel computes in fp32) give torch's results."""
    ours, theirs = _params(dtype=dtype), _params(dtype=dtype)
    opt = AdamW(_groups(ours), **{**HYPER, **options}, backend="triton")
    ref = torch.optim.AdamW(_groups(theirs), **{**HYPER, **options})
    _run(opt, ours, 2)
    _run(ref, theirs, 2)
    assert all(torch.equal(p, q) for p, q in zip(ours, theirs, strict=True))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_step_hooks_run_once(backend):
    """torch wraps ``torch.optim.AdamW.step`` with the hook runner once a torch AdamW exists; the torch groups'
    step taken from inside ours must not run the hooks again."""
    torch.optim.AdamW(_params())
    params = _params()
    opt = AdamW(_groups(params), **HYPER, backend=backend)
    opt.param_groups[0]["amsgrad"] = True  # a torch-stepped group with the Triton backend too
    calls = []
    opt.register_step_pre_hook(lambda *_: calls.append("pre"))
    opt.register_step_post_hook(lambda *_: calls.append("post"))
    _run(opt, params, 1)
    assert calls == ["pre", "post"]


def test_loading_keeps_this_optimizers_implementation():
    """A checkpoint of torch's fused AdamW continues in the Triton step: the group keeps its own ``fused`` flag and
    every ``step`` count is on the host, where the Triton step reads it."""
    a, b = _params(), _params()
    ref = torch.optim.AdamW(_groups(a), **HYPER, fused=True)
    _run(ref, a, 2)
    ours = _resumed_from(ref, a, b)
    assert not any(group["fused"] for group in ours.param_groups)
    assert all(ours.state[p]["step"].device.type == "cpu" for p in b)
    _run(ref, a, 2, seed=5)
    _run(ours, b, 2, seed=5)
    for p, q in zip(b, a, strict=True):
        _assert_close(p.detach(), q.detach())


@pytest.mark.gpu
def test_gpu_step_matches_torch():
    """On the GPU: a model-sized mix of tensors, several steps against torch's AdamW, with a clipping factor."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(4096, 1000), (1 << 20,), (2048,), (3, 1001)]
    ours = [nn.Parameter(torch.randn(s, device="cuda", generator=gen)) for s in shapes]
    theirs = [nn.Parameter(p.detach().clone()) for p in ours]
    opt = AdamW(_groups(ours), **HYPER, backend="triton")
    ref = torch.optim.AdamW(_groups(theirs), **HYPER, foreach=False)
    for scale in (1.0, 0.3, 0.7):
        for p, q in zip(ours, theirs, strict=True):
            p.grad = torch.randn(p.shape, device="cuda", generator=gen)
            q.grad = p.grad * scale
        opt.step(grad_scale=torch.tensor(scale, device="cuda"))
        ref.step()
    for p, q in zip(ours, theirs, strict=True):
        _assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("source", ["veofast-torch-backend", "torch-capturable"])
def test_gpu_checkpoint_continues(source):
    """On the GPU the torch backend steps fused (its ``step`` counts on the device) and torch's capturable AdamW
    keeps them there too: saved, loaded and continued, both train as if nothing happened."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    a = [nn.Parameter(torch.randn(s, device="cuda", generator=gen)) for s in SHAPES]
    b = [nn.Parameter(p.detach().clone()) for p in a]
    if source == "torch-capturable":
        first = torch.optim.AdamW(_groups(a), **HYPER, capturable=True)
    else:
        first = AdamW(_groups(a), **HYPER, backend="torch")
    for step in range(4):
        if step == 2:
            with torch.no_grad():
                for p, q in zip(b, a, strict=True):
                    p.copy_(q)
            second = AdamW(_groups(b), **HYPER, backend="torch")
            second.load_state_dict(copy.deepcopy(first.state_dict()))
        for i, p in enumerate(a):
            p.grad = torch.randn(p.shape, device="cuda", generator=gen)
            if step >= 2:
                b[i].grad = p.grad.clone()
        first.step()
        if step >= 2:
            second.step()
    for p, q in zip(b, a, strict=True):
        _assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_gpu_bf16_step_within_torchs_rounding():
    """bf16 parameters and moments: |triton - fp64| <= 2 |torch bf16 - fp64| + 1 bf16 ulp at 1 (2^-7), on average and at
    worst (the kernel does the math in fp32 and rounds once)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    ref = [nn.Parameter(torch.randn(s, device="cuda", generator=gen, dtype=torch.float64)) for s in SHAPES]
    ours = [nn.Parameter(p.detach().bfloat16()) for p in ref]
    theirs = [nn.Parameter(p.detach().bfloat16()) for p in ref]
    opts = [
        AdamW(_groups(ours), **HYPER, backend="triton"),
        torch.optim.AdamW(_groups(theirs), **HYPER),
        torch.optim.AdamW(_groups(ref), **HYPER),
    ]
    for _ in range(5):
        for p, q, r in zip(ours, theirs, ref, strict=True):
            r.grad = torch.randn(r.shape, device="cuda", generator=gen, dtype=torch.float64)
            p.grad, q.grad = r.grad.bfloat16(), r.grad.bfloat16()
        for opt in opts:
            opt.step()
    assert ours[0].dtype == opts[0].state[ours[0]]["exp_avg"].dtype == torch.bfloat16
    err = torch.cat([(p.double() - r.detach()).abs().flatten() for p, r in zip(ours, ref, strict=True)])
    torch_err = torch.cat([(q.double() - r.detach()).abs().flatten() for q, r in zip(theirs, ref, strict=True)])
    assert err.mean() <= 2 * torch_err.mean() + 2**-7 and err.max() <= 2 * torch_err.max() + 2**-7


@pytest.mark.parametrize("flags", [{"foreach": True}, {"foreach": False}, {"fused": True}])
def test_torch_implementation_flags_take_torchs_step(flags):
    """torch's arguments are taken: choosing one of torch's implementations runs it, and refuses backend='triton'."""
    ours, theirs = _params(), _params()
    opt = AdamW(_groups(ours), **HYPER, **flags)
    ref = torch.optim.AdamW(_groups(theirs), **HYPER, **flags)
    _run(opt, ours, 2)
    _run(ref, theirs, 2)
    assert opt.backend == "torch" and all(torch.equal(p, q) for p, q in zip(ours, theirs, strict=True))
    with pytest.raises(ValueError, match="backend='triton'"):
        AdamW(_params(), **flags, backend="triton")


def test_bad_backend_is_refused():
    with pytest.raises(ValueError, match="backend"):
        AdamW(_params(), backend="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_gpu_step_on_the_parameters_device():
    """Parameters on cuda:1 while cuda:0 is current step as they do on cuda:0 (the Triton update was launched on
    the current device and failed)."""
    results = []
    for device in ("cuda:0", "cuda:1"):
        gen = torch.Generator(device=device).manual_seed(0)
        params = [nn.Parameter(torch.randn(s, device=device, generator=gen)) for s in SHAPES]
        opt = AdamW(_groups(params), **HYPER, backend="triton")
        with torch.cuda.device(0):
            for _ in range(2):
                for p in params:
                    p.grad = torch.randn(p.shape, device=device, generator=gen)
                opt.step(grad_scale=torch.tensor(0.5, device=device))
        results.append([p.detach().cpu() for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))
