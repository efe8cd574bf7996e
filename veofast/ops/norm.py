"""RMSNorm, optionally fused with the residual add before it: the reference, the Triton path and dispatch.

Semantics are those of the HF Llama/Qwen ``RMSNorm``: ``h = x + residual`` in the input dtype, then
``weight * (h32 * rsqrt(mean(h32**2) + eps)).to(h.dtype)`` with ``h32`` in fp32. The output dtype is
``promote_types(x.dtype, weight.dtype)``, as in HF.

The Triton kernel computes ``h32 * rstd * weight`` in fp32 and rounds once, where HF rounds the normalised value to
the input dtype and multiplies by the weight in the weight's dtype (rounding a second time). The fused result is at
least as close to the exact value; the two differ by about one rounding of the output dtype (bf16: ~2**-8 relative).
"""

import torch

from veofast.ops._backend import on_inputs_device, resolve_backend, triton_or_fallback
from veofast.ops._eager import direct, with_autograd

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def rms_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float, *, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch RMSNorm, exactly as HF Llama/Qwen compute it (the CPU path and the test oracle).

    x: (..., H); weight: (H,); residual: like x, or None. Returns y (..., H), or (y, h) with h = x + residual
    when a residual is given. Statistics are taken in fp32 (in float64 for float64 inputs).
    """
    h = x if residual is None else x + residual
    h_acc = h.to(torch.promote_types(h.dtype, torch.float32))
    normed = h_acc * torch.rsqrt(h_acc.pow(2).mean(-1, keepdim=True) + eps)
    y = weight * normed.to(h.dtype)
    return y if residual is None else (y, h)


def _check(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None) -> None:
    if not x.is_floating_point() or x.dim() < 1:
        raise ValueError(f"rms_norm: x must be a floating tensor of shape (..., H), got {x.dtype} {tuple(x.shape)}")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"rms_norm: weight must have shape ({x.shape[-1]},), got {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise ValueError(f"rms_norm: weight must be a floating tensor, got {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"rms_norm: weight is on {weight.device} but x is on {x.device}")
    if isinstance(eps, bool) or not isinstance(eps, int | float) or not eps >= 0:  # NaN fails too
        raise ValueError(f"rms_norm: eps must be a non-negative float, got {eps!r}")
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
            raise ValueError(
                f"rms_norm: residual must match x ({x.dtype} {tuple(x.shape)} on {x.device}), "
                f"got {residual.dtype} {tuple(residual.shape)} on {residual.device}"
            )


def _triton_unsupported(x: torch.Tensor, weight: torch.Tensor) -> str | None:
    """Why the Triton kernels cannot take these inputs, or None."""
    from veofast.kernels.norm import MAX_HIDDEN

    if x.dtype not in _TRITON_DTYPES or weight.dtype not in _TRITON_DTYPES:
        return f"the triton backend takes x and weight in {_TRITON_DTYPES}, got {x.dtype} and {weight.dtype}"
    if not 1 <= x.shape[-1] <= MAX_HIDDEN:
        return f"the triton backend takes 1 <= H <= {MAX_HIDDEN}, got x with H = {x.shape[-1]}"
    return None


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., H) -> contiguous (N, H)."""
    return t.reshape(-1, t.shape[-1]).contiguous()


def _rms_norm_impl(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    from veofast.kernels.norm import rms_norm_fwd

    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    y, _ = rms_norm_fwd(_rows(x), weight.contiguous(), None, eps, out_dtype, shape=x.shape)
    return y


_rms_norm_op = torch.library.custom_op("veofast::rms_norm", _rms_norm_impl, mutates_args=())


@_rms_norm_op.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))


def _add_rms_norm_impl(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    from veofast.kernels.norm import rms_norm_fwd

    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    return rms_norm_fwd(_rows(x), weight.contiguous(), _rows(residual), eps, out_dtype, shape=x.shape)


_add_rms_norm_op = torch.library.custom_op("veofast::add_rms_norm", _add_rms_norm_impl, mutates_args=())


@_add_rms_norm_op.register_fake
def _(x, residual, weight, eps):
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype)), x.new_empty(x.shape)


def _rms_norm_backward_impl(
    dy: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, dh_out: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    from veofast.kernels.norm import rms_norm_bwd

    dh_rows = _rows(dh_out) if dh_out is not None else None
    return rms_norm_bwd(_rows(dy), _rows(h), weight.contiguous(), dh_rows, eps, shape=h.shape)


_rms_norm_backward_op = torch.library.custom_op("veofast::rms_norm_backward", _rms_norm_backward_impl, mutates_args=())


@_rms_norm_backward_op.register_fake
def _(dy, h, weight, dh_out, eps):
    return h.new_empty(h.shape), weight.new_empty(weight.shape)


_rms_norm_backward = direct(_rms_norm_backward_op, _rms_norm_backward_impl)


def _setup_rms_norm(ctx, inputs, output):
    x, weight, eps = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps = eps


def _backward_rms_norm(ctx, dy):
    x, weight = ctx.saved_tensors
    dx, dweight = _rms_norm_backward(dy, x, weight, None, ctx.eps)
    return dx, dweight if ctx.needs_input_grad[1] else None, None


def _setup_add_rms_norm(ctx, inputs, output):
    _, _, weight, eps = inputs
    ctx.save_for_backward(output[1], weight)
    ctx.eps = eps


def _backward_add_rms_norm(ctx, dy, dh_out):
    h, weight = ctx.saved_tensors
    dh, dweight = _rms_norm_backward(dy, h, weight, dh_out, ctx.eps)
    return dh, dh, dweight if ctx.needs_input_grad[2] else None, None


_rms_norm = with_autograd(_rms_norm_op, _rms_norm_impl, _backward_rms_norm, _setup_rms_norm)
_add_rms_norm = with_autograd(_add_rms_norm_op, _add_rms_norm_impl, _backward_add_rms_norm, _setup_add_rms_norm)


@on_inputs_device
def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    residual: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of ``x`` (plus ``residual``, when given), scaled by ``weight``; differentiable in x, weight, residual.

    x: (..., H); weight: (H,); residual: like x, or None. Returns y (..., H) in
    ``promote_types(x.dtype, weight.dtype)``, or ``(y, h)`` where h = x + residual (..., H) in x's dtype is the
    residual stream for the next layer. ``backend``: ``"auto"`` (Triton on CUDA; inputs the kernels do not take,
    float64, H of 0 or above 65536, go to the reference, logged once), ``"triton"`` or ``"torch"``.
    Raises ValueError, before any kernel runs, for shapes, dtypes (floating point) or devices other than these, a
    negative or NaN eps, and with ``backend="triton"`` for the inputs that ``"auto"`` sends to the reference.
    """
    _check(x, weight, eps, residual)
    chosen = resolve_backend("rms_norm", backend, x.device)
    if chosen == "triton":
        chosen = triton_or_fallback("rms_norm", backend, _triton_unsupported(x, weight))
    if chosen == "torch":
        return rms_norm_reference(x, weight, eps, residual=residual)
    if residual is None:
        return _rms_norm(x, weight, float(eps))
    return _add_rms_norm(x, residual, weight, float(eps))
