"""One AdamW update of one parameter tensor in one pass over memory, optionally writing its low-precision copy.

``adamw_update_`` reads the parameter, its gradient and the two moment estimates once and writes the parameter
and the moments back, which is the floor of the update: 28 bytes per fp32 parameter. With ``compute_copy`` it
also writes the updated parameter in the copy's dtype (2 more bytes for bf16), which saves the training step
the separate cast of every weight before the next forward (6 bytes per parameter).

Measured on an H200 (one launch per tensor of a Llama-3.2-1B-shaped model, 1.24e9 fp32 parameters): 8.67 ms
(3.99 TB/s) without a copy and 9.25 ms with a bf16 copy, against 10.00 ms (3.46 TB/s) for torch's fused AdamW
and 2.14 ms for the casts it leaves to the forward (blocks of 1024 with 4 warps; 2048 to 8192 were 2-20% slower).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _round_to_bf16(x):
    """fp32 -> bf16 rounded to nearest, ties to even, as torch casts (the Triton interpreter's own conversion
    truncates); NaN stays NaN."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return tl.where(x != x, x.to(tl.bfloat16), rounded)


@triton.jit
def _adamw_kernel(
    PARAM,
    GRAD,
    EXP_AVG,
    EXP_AVG_SQ,
    COPY,
    GRAD_SCALE,
    numel,
    decay,
    avg_weight,
    beta2,
    sq_weight,
    step_size,
    inv_bias_correction2_sqrt,
    eps,
    HAS_COPY: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """In place over BLOCK elements of flat contiguous tensors, math in fp32: g *= GRAD_SCALE[0] (if given);
    p *= decay; m += avg_weight * (g - m); v = v * beta2 + sq_weight * g^2;
    p -= step_size * m / (sqrt(v) * inv_bias_correction2_sqrt + eps); COPY = p in COPY's dtype."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    p = tl.load(PARAM + offs, mask=mask).to(tl.float32)
    g = tl.load(GRAD + offs, mask=mask).to(tl.float32)
    m = tl.load(EXP_AVG + offs, mask=mask).to(tl.float32)
    v = tl.load(EXP_AVG_SQ + offs, mask=mask).to(tl.float32)
    if HAS_GRAD_SCALE:
        g = g * tl.load(GRAD_SCALE).to(tl.float32)
    p = p * decay
    m = m + avg_weight * (g - m)
    v = v * beta2 + sq_weight * g * g
    p = p - step_size * (m / (tl.sqrt(v) * inv_bias_correction2_sqrt + eps))
    tl.store(PARAM + offs, p.to(PARAM.dtype.element_ty), mask=mask)
    tl.store(EXP_AVG + offs, m.to(EXP_AVG.dtype.element_ty), mask=mask)
    tl.store(EXP_AVG_SQ + offs, v.to(EXP_AVG_SQ.dtype.element_ty), mask=mask)
    if HAS_COPY:
        if COPY.dtype.element_ty == tl.bfloat16:
            tl.store(COPY + offs, _round_to_bf16(p), mask=mask)
        else:
            tl.store(COPY + offs, p.to(COPY.dtype.element_ty), mask=mask)


def adamw_update_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    compute_copy: torch.Tensor | None = None,
    grad_scale: torch.Tensor | None = None,
) -> None:
    """``torch.optim.AdamW``'s update (decoupled weight decay, bias correction at ``step`` >= 1, no amsgrad) of
    ``param`` in place, and of ``exp_avg``, ``exp_avg_sq``; then ``compute_copy.copy_(param)`` in the same pass.

    All tensors contiguous, of one shape and on one device; ``grad`` and the moments in any float dtype (math is
    fp32); ``compute_copy`` any float dtype. ``grad_scale``: a 1-element tensor on the device the update multiplies
    the gradient by (gradient clipping without a pass over the gradients; ``grad`` itself is not changed). Nothing
    is read back to the host.
    """
    tensors = (param, grad, exp_avg, exp_avg_sq) + (() if compute_copy is None else (compute_copy,))
    if any(not t.is_contiguous() or t.shape != param.shape for t in tensors):
        raise ValueError("adamw_update_: all tensors must be contiguous and of the parameter's shape")
    if grad_scale is not None and (grad_scale.numel() != 1 or grad_scale.device != param.device):
        raise ValueError("adamw_update_: grad_scale must be a 1-element tensor on the parameter's device")
    numel = param.numel()
    if numel == 0:
        return
    bias_correction1 = 1.0 - beta1**step
    bias_correction2 = 1.0 - beta2**step
    _adamw_kernel[(triton.cdiv(numel, BLOCK),)](
        param,
        grad,
        exp_avg,
        exp_avg_sq,
        param if compute_copy is None else compute_copy,
        param if grad_scale is None else grad_scale,
        numel,
        1.0 - lr * weight_decay,
        1.0 - beta1,
        beta2,
        1.0 - beta2,
        lr / bias_correction1,
        1.0 / bias_correction2**0.5,
        eps,
        HAS_COPY=compute_copy is not None,
        HAS_GRAD_SCALE=grad_scale is not None,
        BLOCK=BLOCK,
        num_warps=4,
    )
