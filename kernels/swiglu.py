"""Triton kernels of SwiGLU, ``silu(gate) * up``, and their host launchers.

Element-wise over (N, I) rows that may be strided (e.g. the two halves of a fused gate/up projection): each
program takes a ``BLOCK_M x BLOCK_N`` tile, with ``BLOCK_N`` a power of two that divides I when it can (no masked
lanes) and several rows per program when I is small. Math in fp32; the backward recomputes ``sigmoid(gate)``.
"""

import torch
import triton
import triton.language as tl

# Elements per program tile that the launch heuristics aim for, and the widest column block.
_TILE_ELEMENTS = 4096
_MAX_BLOCK_N = 2048


@triton.jit
def _swiglu_fwd_kernel(
    g_ptr,
    u_ptr,
    y_ptr,
    n_rows,
    n_cols,
    stride_g,
    stride_u,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    g = tl.load(g_ptr + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(y_ptr + rows[:, None] * n_cols + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    dy_ptr,
    g_ptr,
    u_ptr,
    dg_ptr,
    du_ptr,
    n_rows,
    n_cols,
    stride_dy,
    stride_g,
    stride_u,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    dy = tl.load(dy_ptr + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    # d silu / dg = sig * (1 + g * (1 - sig))
    dg = dy * u * sig * (1.0 + g * (1.0 - sig))
    out = rows[:, None] * n_cols + cols[None, :]
    tl.store(dg_ptr + out, dg.to(dg_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + out, (dy * silu).to(du_ptr.dtype.element_ty), mask=mask)


def _launch_config(n_rows: int, n_cols: int) -> tuple[tuple[int, int], int, int, int]:
    """(grid, BLOCK_M, BLOCK_N, num_warps) for an (n_rows, n_cols) problem."""
    divisor = n_cols & -n_cols  # largest power of two dividing n_cols
    block_n = min(_MAX_BLOCK_N, divisor if divisor >= 128 else triton.next_power_of_2(n_cols))
    block_m = max(1, min(_TILE_ELEMENTS // block_n, triton.next_power_of_2(n_rows)))
    num_warps = min(8, max(1, block_m * block_n // 512))
    grid = (triton.cdiv(n_rows, block_m), triton.cdiv(n_cols, block_n))
    return grid, block_m, block_n, num_warps


def swiglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up: (N, I) with unit column stride (any row stride). Returns silu(gate) * up, (N, I) contiguous."""
    n_rows, n_cols = gate.shape
    y = torch.empty((n_rows, n_cols), dtype=gate.dtype, device=gate.device)
    if y.numel() == 0:
        return y
    grid, block_m, block_n, num_warps = _launch_config(n_rows, n_cols)
    _swiglu_fwd_kernel[grid](
        gate, up, y, n_rows, n_cols, gate.stride(0), up.stride(0), BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps
    )
    return y


def swiglu_bwd(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """dy, gate, up: (N, I) with unit column stride. Returns (dgate, dup), each (N, I) contiguous."""
    n_rows, n_cols = gate.shape
    dgate = torch.empty((n_rows, n_cols), dtype=gate.dtype, device=gate.device)
    dup = torch.empty_like(dgate)
    if dgate.numel() == 0:
        return dgate, dup
    grid, block_m, block_n, num_warps = _launch_config(n_rows, n_cols)
    _swiglu_bwd_kernel[grid](
        dy,
        gate,
        up,
        dgate,
        dup,
        n_rows,
        n_cols,
        dy.stride(0),
        gate.stride(0),
        up.stride(0),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=num_warps,
    )
    return dgate, dup
