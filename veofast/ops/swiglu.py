"""SwiGLU activation ``silu(gate) * up``: the reference, the Triton path and dispatch.

The math is done in fp32 and rounded once to the input dtype. (HF's ``act_fn(gate) * up`` rounds ``silu(gate)`` to
the input dtype before the multiply: in bf16 the two differ by about one bf16 rounding.) gate and up may be strided
views, e.g. the two halves of a fused gate/up projection; the outputs are contiguous.
"""

import math

import torch
import torch.nn.functional as F

from veofast.ops._backend import on_inputs_device, resolve_backend, triton_or_fallback
from veofast.ops._eager import direct, with_autograd

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Plain-torch ``silu(gate) * up`` in fp32 (float64 for float64 inputs), cast to the input dtype.

    gate, up: (..., I). Returns (..., I).
    """
    acc = torch.promote_types(gate.dtype, torch.float32)
    return (F.silu(gate.to(acc)) * up.to(acc)).to(gate.dtype)


def _check(gate: torch.Tensor, up: torch.Tensor) -> None:
    if not gate.is_floating_point() or gate.dim() < 1:
        raise ValueError(f"swiglu: gate must be a floating tensor (..., I), got {gate.dtype} {tuple(gate.shape)}")
    if up.shape != gate.shape or up.dtype != gate.dtype or up.device != gate.device:
        raise ValueError(
            f"swiglu: up must match gate ({gate.dtype} {tuple(gate.shape)} on {gate.device}), "
            f"got {up.dtype} {tuple(up.shape)} on {up.device}"
        )


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., I) -> (N, I) with unit column stride; a view when the layout allows."""
    rows = t.reshape(math.prod(t.shape[:-1]), t.shape[-1])  # not -1: I may be 0
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _swiglu_impl(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    from veofast.kernels.swiglu import swiglu_fwd

    return swiglu_fwd(_rows(gate), _rows(up), shape=gate.shape)


_swiglu_op = torch.library.custom_op("veofast::swiglu", _swiglu_impl, mutates_args=())


@_swiglu_op.register_fake
def _(gate, up):
    return gate.new_empty(gate.shape)


def _swiglu_backward_impl(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from veofast.kernels.swiglu import swiglu_bwd

    return swiglu_bwd(_rows(dy), _rows(gate), _rows(up), shape=gate.shape)


_swiglu_backward_op = torch.library.custom_op("veofast::swiglu_backward", _swiglu_backward_impl, mutates_args=())


@_swiglu_backward_op.register_fake
def _(dy, gate, up):
    return gate.new_empty(gate.shape), gate.new_empty(gate.shape)


_swiglu_backward = direct(_swiglu_backward_op, _swiglu_backward_impl)


def _setup_swiglu(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward_swiglu(ctx, dy):
    gate, up = ctx.saved_tensors
    return _swiglu_backward(dy, gate, up)


_swiglu = with_autograd(_swiglu_op, _swiglu_impl, _backward_swiglu, _setup_swiglu)


@on_inputs_device
def swiglu(gate: torch.Tensor, up: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """``silu(gate) * up``; differentiable in gate and up.

    gate, up: (..., I), same dtype (any strides). Returns a contiguous (..., I) in the input dtype. ``backend``:
    ``"auto"`` (Triton on CUDA; float64 goes to the reference, logged once), ``"triton"`` or ``"torch"``.
    Raises ValueError, before any kernel runs, for a gate that is not floating point or an up that differs from it
    in shape, dtype or device, and with ``backend="triton"`` for float64.
    """
    _check(gate, up)
    chosen = resolve_backend("swiglu", backend, gate.device)
    if chosen == "triton" and gate.dtype not in _TRITON_DTYPES:
        reason = f"the triton backend takes gate and up in {_TRITON_DTYPES}, got {gate.dtype}"
        chosen = triton_or_fallback("swiglu", backend, reason)
    if chosen == "torch":  # contiguous like the kernel's output, also for transposed inputs
        return swiglu_reference(gate, up).contiguous()
    return _swiglu(gate, up)
