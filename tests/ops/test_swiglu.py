"""swiglu: Triton path (interpreter on CPU, bf16 on GPU) and torch path against a float64 reference."""

import sys

import pytest
import torch

from veofast.ops.swiglu import swiglu, swiglu_reference

# Error floor per dtype, relative to the largest reference value.
FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def assert_close(name, fast, ref_dtype, ref64, dtype, k=2.0):
    """|fast - ref64| <= k * |ref_dtype - ref64| + floor, in the max norm."""
    err_fast = (fast.double() - ref64).abs().max().item()
    err_ref = (ref_dtype.double() - ref64).abs().max().item()
    bound = k * err_ref + FLOOR[dtype] * max(1.0, ref64.abs().max().item())
    assert err_fast <= bound, f"{name}: error {err_fast:.3g} > bound {bound:.3g} (torch {dtype} error {err_ref:.3g})"


def run(gate_up, dy, backend, cast=None):
    """swiglu of the two halves of ``gate_up`` (..., 2I), as a fused projection gives them; returns y, d(gate_up)."""
    leaf = gate_up.detach().to(cast or gate_up.dtype).requires_grad_()
    gate, up = leaf.chunk(2, dim=-1)
    y = swiglu_reference(gate, up) if backend == "reference" else swiglu(gate, up, backend=backend)
    (grad,) = torch.autograd.grad((y * dy.to(y.dtype)).sum(), [leaf])
    return y, grad


def check_against_reference(shape, dtype, device, backend, *, scale=1.0):
    gen = torch.Generator(device=device).manual_seed(sum(shape))
    randn = lambda *s: (scale * torch.randn(*s, generator=gen, device=device)).to(dtype)
    gate_up, dy = randn(*shape[:-1], 2 * shape[-1]), randn(*shape)
    y, grad = run(gate_up, dy, backend)
    y_ref, grad_ref = run(gate_up, dy, "reference")
    y64, grad64 = run(gate_up, dy, "reference", cast=torch.float64)
    assert y.dtype == dtype and y.shape == shape and grad.dtype == dtype
    assert_close("y", y, y_ref, y64, dtype)
    assert_close("dgate, dup", grad, grad_ref, grad64, dtype)


@pytest.mark.parametrize("shape", [(1, 1), (97, 97), (3, 1000), (2, 4096), (5, 768), (2, 3, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_interpreter_matches_reference(shape, dtype):
    check_against_reference(shape, dtype, "cpu", "triton")


def test_triton_interpreter_large_gate_values():
    """sigmoid saturates without inf/nan for |gate| in the tens."""
    check_against_reference((4, 64), torch.float32, "cpu", "triton", scale=30.0)


def test_triton_interpreter_contiguous_inputs():
    gate, up = torch.randn(3, 50), torch.randn(3, 50)
    torch.testing.assert_close(swiglu(gate, up, backend="triton"), swiglu_reference(gate, up))


@pytest.mark.parametrize("config", [{"tile": 256, "warps": 2}, {"tile": 64, "warps": 1}])
def test_triton_interpreter_kernel_configs(config):
    """The launchers at tiles other than the pinned ones (the GPU sweep times these): partial row blocks (256: two
    rows of 128 columns) and partial column blocks (64), against float64."""
    from veofast.kernels.swiglu import swiglu_bwd, swiglu_fwd

    gen = torch.Generator().manual_seed(3)
    gate_up, dy = torch.randn(13, 160, generator=gen), torch.randn(13, 80, generator=gen)
    gate, up = gate_up.chunk(2, dim=-1)
    g64, u64 = gate.double().requires_grad_(), up.double().requires_grad_()
    y64 = swiglu_reference(g64, u64)
    torch.testing.assert_close(swiglu_fwd(gate, up, config=config).double(), y64, rtol=1e-5, atol=1e-5)
    grads64 = torch.autograd.grad(y64, [g64, u64], dy.double())
    for got, want in zip(swiglu_bwd(dy, gate, up, config=config), grads64, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_torch_backend_is_reference():
    gate, up = torch.randn(4, 33, dtype=torch.float16), torch.randn(4, 33, dtype=torch.float16)
    assert torch.equal(swiglu(gate, up, backend="torch"), swiglu_reference(gate, up))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compiles(backend):
    gate, up = torch.randn(5, 24, requires_grad=True), torch.randn(5, 24, requires_grad=True)

    def step(gate, up):
        return swiglu(gate, up, backend=backend).square().sum()

    eager = torch.autograd.grad(step(gate, up), [gate, up])
    compiled = torch.autograd.grad(torch.compile(step, backend="aot_eager", fullgraph=True)(gate, up), [gate, up])
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "gate, up, backend, match",
    [
        (torch.ones(2, 8), torch.ones(2, 7), "auto", "up must match gate"),
        (torch.ones(2, 8), torch.ones(2, 8, dtype=torch.float16), "auto", "up must match gate"),
        (torch.ones(2, 8, dtype=torch.int32), torch.ones(2, 8, dtype=torch.int32), "auto", "gate must be a floating"),
        (torch.ones(2, 8), torch.ones(2, 8), "gpu", "backend must be one of"),
        (torch.ones(2, 8).double(), torch.ones(2, 8).double(), "triton", "triton backend takes"),
    ],
)
def test_bad_inputs_raise(gate, up, backend, match):
    with pytest.raises(ValueError, match=match):
        swiglu(gate, up, backend=backend)


def test_auto_falls_back_where_the_kernels_cannot_run(monkeypatch):
    """Where ``auto`` picks Triton (CUDA, simulated by patching resolve_backend), inputs the kernels do not take
    (float64) run on the reference, logged once; ``backend="triton"`` raises for them."""
    module = sys.modules[swiglu.__module__]
    monkeypatch.setattr(
        module, "resolve_backend", lambda op, backend, device: "torch" if backend == "torch" else "triton"
    )
    gate, up = torch.randn(3, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    assert torch.equal(swiglu(gate, up), swiglu_reference(gate, up))
    with pytest.raises(ValueError, match="triton backend takes"):
        swiglu(gate, up, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(16384, 8192), (131072, 768), (4099, 1000), (2, 97, 1376)])
def test_gpu_bf16_matches_reference(shape):
    check_against_reference(shape, torch.bfloat16, "cuda", "auto")
