"""rms_norm: Triton path (interpreter on CPU, bf16 on GPU) and torch path against a float64 reference."""

import sys

import pytest
import torch

from veofast.ops.norm import rms_norm, rms_norm_reference

# Error floor per dtype, relative to the largest reference value.
FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
EPS = 1e-6


def assert_close(name, fast, ref_dtype, ref64, dtype, k=2.0):
    """|fast - ref64| <= k * |ref_dtype - ref64| + floor, in the max norm."""
    err_fast = (fast.double() - ref64).abs().max().item()
    err_ref = (ref_dtype.double() - ref64).abs().max().item()
    bound = k * err_ref + FLOOR[dtype] * max(1.0, ref64.abs().max().item())
    assert err_fast <= bound, f"{name}: error {err_fast:.3g} > bound {bound:.3g} (torch {dtype} error {err_ref:.3g})"


def run(x, weight, residual, grads, backend, cast=None):
    """Forward + backward of rms_norm on copies of the inputs (cast to ``cast``); returns outputs and grads."""
    leaves = [t.detach().to(cast or t.dtype).requires_grad_() for t in (x, weight, residual) if t is not None]
    x_, w_ = leaves[0], leaves[1]
    r_ = leaves[2] if residual is not None else None
    if backend == "reference":
        out = rms_norm_reference(x_, w_, EPS, residual=r_)
    else:
        out = rms_norm(x_, w_, EPS, residual=r_, backend=backend)
    outs = out if isinstance(out, tuple) else (out,)
    loss = sum((o * g.to(o.dtype)).sum() for o, g in zip(outs, grads, strict=True))
    return outs, torch.autograd.grad(loss, leaves)


def check_against_reference(shape, dtype, with_residual, device, backend, weight_dtype=None):
    gen = torch.Generator(device=device).manual_seed(hash((shape, with_residual)) % 2**31)
    randn = lambda *s, dt=dtype: torch.randn(*s, generator=gen, device=device, dtype=torch.float32).to(dt)
    x = randn(*shape)
    weight = 1.0 + 0.5 * randn(shape[-1], dt=weight_dtype or dtype)
    residual = randn(*shape) if with_residual else None
    out_dtype = torch.promote_types(dtype, weight.dtype)
    grads = [randn(*shape, dt=out_dtype)] + ([randn(*shape)] if with_residual else [])

    outs, dgrads = run(x, weight, residual, grads, backend)
    outs_ref, dgrads_ref = run(x, weight, residual, grads, "reference")
    outs64, dgrads64 = run(x, weight, residual, grads, "reference", cast=torch.float64)
    assert outs[0].dtype == out_dtype and outs[0].shape == x.shape
    for name, a, b, c in zip(["y", "h"][: len(outs)], outs, outs_ref, outs64, strict=True):
        assert_close(name, a, b, c, dtype)
    for name, a, b, c in zip(["dx", "dweight", "dresidual"][: len(dgrads)], dgrads, dgrads_ref, dgrads64, strict=True):
        assert a.dtype == b.dtype
        assert_close(name, a, b, c, dtype)


@pytest.mark.parametrize("shape", [(1, 1), (3, 97), (2, 1000), (2, 4096), (97, 64), (2, 3, 33)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_triton_interpreter_matches_reference(shape, dtype, with_residual):
    check_against_reference(shape, dtype, with_residual, "cpu", "triton")


def test_triton_interpreter_weight_dtype_promotes():
    check_against_reference((5, 48), torch.float16, True, "cpu", "triton", weight_dtype=torch.float32)


@pytest.mark.parametrize(
    "config",
    [
        {"rows": 4, "warps": 4, "stages": 1, "per_sm": 0},  # one block per program, the last one partial
        {"rows": 2, "warps": 4, "stages": 2, "per_sm": 1},  # persistent: several blocks per program, pipelined
        {"rows": 1, "warps": 2, "stages": 3, "per_sm": 8},  # more programs than blocks
    ],
)
@pytest.mark.parametrize("with_residual", [False, True])
def test_triton_interpreter_kernel_configs(config, with_residual):
    """The launchers at configs other than the pinned ones (the GPU sweep times these) against float64."""
    from veofast.kernels.norm import rms_norm_bwd, rms_norm_fwd

    gen = torch.Generator().manual_seed(7)
    x, residual, dy, dh_out = (torch.randn(11, 40, generator=gen) for _ in range(4))
    weight = 1 + 0.5 * torch.randn(40, generator=gen)
    r = residual if with_residual else None
    y, h = rms_norm_fwd(x, weight, r, EPS, torch.float32, config=config)
    h_ref = x + residual if with_residual else x
    h64, w64 = h_ref.double().requires_grad_(), weight.double().requires_grad_()
    y64 = rms_norm_reference(h64, w64, EPS)
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    if with_residual:
        torch.testing.assert_close(h, h_ref)
    dh64, dw64 = torch.autograd.grad(y64, [h64, w64], dy.double())
    dx, dw = rms_norm_bwd(dy, h_ref, weight, dh_out if with_residual else None, EPS, config=config | {"per_sm": 1})
    torch.testing.assert_close(dx.double(), dh64 + dh_out.double() if with_residual else dh64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dw.double(), dw64, rtol=1e-5, atol=1e-5)


def test_backward_config_needs_a_persistent_grid():
    from veofast.kernels.norm import config_for

    with pytest.raises(ValueError, match="per_sm >= 1"):
        config_for("bwd", 64, {"per_sm": 0})


def test_torch_backend_is_reference():
    x, w, r = torch.randn(4, 33), torch.randn(33), torch.randn(4, 33)
    y, h = rms_norm(x, w, EPS, residual=r, backend="torch")
    y_ref, h_ref = rms_norm_reference(x, w, EPS, residual=r)
    assert torch.equal(y, y_ref) and torch.equal(h, h_ref)
    assert torch.equal(rms_norm(x, w, EPS), rms_norm_reference(x, w, EPS))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compiles(backend):
    x, w, r = (torch.randn(*s, requires_grad=True) for s in [(3, 40), (40,), (3, 40)])

    def step(x, w, r):
        y, h = rms_norm(x, w, EPS, residual=r, backend=backend)
        return rms_norm(h, w, EPS, backend=backend).sum() + y.square().sum()

    eager = torch.autograd.grad(step(x, w, r), [x, w, r])
    compiled = torch.autograd.grad(torch.compile(step, backend="aot_eager", fullgraph=True)(x, w, r), [x, w, r])
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(weight=torch.ones(7)), "weight must have shape"),
        (dict(weight=torch.ones(8, 1)), "weight must have shape"),
        (dict(weight=torch.ones(8, dtype=torch.int32)), "weight must be a floating"),
        (dict(x=torch.ones(2, 8, dtype=torch.int64)), "x must be a floating"),
        (dict(residual=torch.ones(2, 7)), "residual must match x"),
        (dict(residual=torch.ones(2, 8, dtype=torch.float16)), "residual must match x"),
        (dict(eps=-1.0), "eps must be"),
        (dict(backend="cuda"), "backend must be one of"),
        (dict(x=torch.ones(2, 8).double(), weight=torch.ones(8).double(), backend="triton"), "triton backend takes"),
    ],
)
def test_bad_inputs_raise(kwargs, match):
    args = dict(x=torch.ones(2, 8), weight=torch.ones(8), eps=EPS, residual=None, backend="auto") | kwargs
    with pytest.raises(ValueError, match=match):
        rms_norm(args.pop("x"), args.pop("weight"), args.pop("eps"), **args)


def test_auto_falls_back_where_the_kernels_cannot_run(monkeypatch):
    """Where ``auto`` picks Triton (CUDA, simulated by patching resolve_backend), inputs the kernels do not take
    (float64) run on the reference, logged once; ``backend="triton"`` raises for them."""
    module = sys.modules[rms_norm.__module__]
    monkeypatch.setattr(
        module, "resolve_backend", lambda op, backend, device: "torch" if backend == "torch" else "triton"
    )
    x, w = torch.randn(3, 8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    assert torch.equal(rms_norm(x, w, EPS), rms_norm_reference(x, w, EPS))
    with pytest.raises(ValueError, match="triton backend takes"):
        rms_norm(x, w, EPS, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("shape", [(16384, 4096), (4099, 2048), (97, 1000)])
def test_gpu_bf16_matches_reference(shape, with_residual):
    check_against_reference(shape, torch.bfloat16, with_residual, "cuda", "auto")


@pytest.mark.gpu
def test_gpu_bf16_input_fp32_weight():
    check_against_reference((4096, 4096), torch.bfloat16, True, "cuda", "auto", weight_dtype=torch.float32)
