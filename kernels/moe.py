"""Triton SwiGLU of the MoE expert FFN: ``a = silu(gate) * up`` on the fused gate/up projection, and its backward.

The projection ``h (M, 2I)`` holds the gate in columns ``[0, I)`` and the up projection in ``[I, 2I)`` (the
``gate_up_proj`` row order of transformers' Qwen3-MoE experts). Math in fp32, one rounding to the output dtype.
The backward also recomputes ``a``, so the expert FFN need not keep it for the down projection's weight gradient.
Row permutation and grouped GEMMs live in ``moe_permute.py`` and ``grouped_gemm.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _tile(width: int) -> tuple[int, int, int]:
    """Rows and columns per program (a tile of about 4096 elements) and warps."""
    block_i = min(max(triton.next_power_of_2(width), 16), 2048)
    return 4096 // block_i, block_i, 8


@triton.jit
def _load_gate_up(h_ptr, M, inter, stride_h, BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr):
    """This program's tile: row indices (BLOCK_M,) int64, column indices (BLOCK_I,), the in-bounds mask, and the
    gate and up halves of ``h`` as fp32 (BLOCK_M, BLOCK_I) (0 out of bounds)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = (rows < M)[:, None] & (cols < inter)[None, :]
    h = h_ptr + rows[:, None] * stride_h + cols[None, :]
    gate = tl.load(h, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(h + inter, mask=mask, other=0.0).to(tl.float32)
    return rows, cols, mask, gate, up


@triton.jit
def _swiglu_fwd_kernel(
    h_ptr,
    a_ptr,
    end_ptr,
    M,
    inter,
    stride_h,
    stride_a,
    HAS_END: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_I: tl.constexpr,
):
    """a[m, i] = silu(h[m, i]) * h[m, inter + i]."""
    if HAS_END:  # rows from the device count at end_ptr on hold no data
        if tl.program_id(0) * BLOCK_M >= tl.load(end_ptr):
            return
    rows, cols, mask, gate, up = _load_gate_up(h_ptr, M, inter, stride_h, BLOCK_M, BLOCK_I)
    a = gate * tl.sigmoid(gate) * up
    tl.store(a_ptr + rows[:, None] * stride_a + cols[None, :], a.to(a_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    h_ptr,
    grad_a_ptr,
    grad_h_ptr,
    a_ptr,
    end_ptr,
    M,
    inter,
    stride_h,
    stride_ga,
    stride_gh,
    stride_a,
    HAS_END: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_I: tl.constexpr,
):
    """grad_h = (grad_a * up * silu'(gate), grad_a * silu(gate)); also a = silu(gate) * up (recomputed)."""
    if HAS_END:  # rows from the device count at end_ptr on hold no data
        if tl.program_id(0) * BLOCK_M >= tl.load(end_ptr):
            return
    rows, cols, mask, gate, up = _load_gate_up(h_ptr, M, inter, stride_h, BLOCK_M, BLOCK_I)
    grad_a = tl.load(grad_a_ptr + rows[:, None] * stride_ga + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    grad_gate = grad_a * up * sig * (1.0 + gate * (1.0 - sig))
    grad_h = grad_h_ptr + rows[:, None] * stride_gh + cols[None, :]
    tl.store(grad_h, grad_gate.to(grad_h_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_h + inter, (grad_a * silu).to(grad_h_ptr.dtype.element_ty), mask=mask)
    tl.store(a_ptr + rows[:, None] * stride_a + cols[None, :], (silu * up).to(a_ptr.dtype.element_ty), mask=mask)


def swiglu(h: torch.Tensor, rows_end: torch.Tensor | None = None) -> torch.Tensor:
    """``a (M, I) = silu(h[:, :I]) * h[:, I:]`` for ``h (M, 2I)`` with unit column stride. ``rows_end``: an
    optional one-element device tensor; rows from its value on are left unwritten (rows that hold no data, e.g.
    past the last expert's end)."""
    rows, width = h.shape
    inter = width // 2
    a = torch.empty((rows, inter), dtype=h.dtype, device=h.device)
    if a.numel() == 0:
        return a
    block_m, block_i, warps = _tile(inter)
    grid = (triton.cdiv(rows, block_m), triton.cdiv(inter, block_i))
    _swiglu_fwd_kernel[grid](
        h,
        a,
        h if rows_end is None else rows_end,
        rows,
        inter,
        h.stride(0),
        a.stride(0),
        HAS_END=rows_end is not None,
        BLOCK_M=block_m,
        BLOCK_I=block_i,
        num_warps=warps,
    )
    return a


def swiglu_backward(
    h: torch.Tensor, grad_a: torch.Tensor, rows_end: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_h (M, 2I), a (M, I))``: the gradient of ``swiglu`` at ``h`` for ``grad_a``, and ``swiglu(h)``
    (``rows_end``: as in ``swiglu``)."""
    rows, width = h.shape
    inter = width // 2
    grad_a = grad_a if grad_a.stride(1) == 1 else grad_a.contiguous()
    grad_h = torch.empty((rows, width), dtype=h.dtype, device=h.device)
    a = torch.empty((rows, inter), dtype=h.dtype, device=h.device)
    if a.numel() == 0:
        return grad_h, a
    block_m, block_i, warps = _tile(inter)
    _swiglu_bwd_kernel[(triton.cdiv(rows, block_m), triton.cdiv(inter, block_i))](
        h,
        grad_a,
        grad_h,
        a,
        h if rows_end is None else rows_end,
        rows,
        inter,
        h.stride(0),
        grad_a.stride(0),
        grad_h.stride(0),
        a.stride(0),
        HAS_END=rows_end is not None,
        BLOCK_M=block_m,
        BLOCK_I=block_i,
        num_warps=warps,
    )
    return grad_h, a
