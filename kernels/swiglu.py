"""Triton kernels of SwiGLU, ``silu(gate) * up``, and their host launchers.

Element-wise over (N, I) rows that may be strided (e.g. the two halves of a fused gate/up projection): each
program takes a ``BLOCK_M x BLOCK_N`` tile of ``tile`` elements, with ``BLOCK_N`` a power of two that divides I when
it can (no masked lanes) and several rows per program when I is small. Math in fp32; the backward recomputes
``sigmoid(gate)``.

Tunables per kernel live in ``CONFIGS``; each launcher takes ``config=`` to override them
(``bench/small_ops.py --sections sweep`` uses it; ``candidates()`` lists configs worth timing).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# tile = elements per program (BLOCK_M x BLOCK_N), warps = warps per program.
CONFIGS: dict[str, dict[str, int]] = {
    "fwd": {"tile": 4096, "warps": 16},  # H200 sweep: 4.33 TB/s geo-mean
    "bwd": {"tile": 4096, "warps": 16},
}
_MAX_BLOCK_N = 2048  # widest column block


@triton.jit
def _tile(n_rows, n_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's (rows (BLOCK_M,) int64, cols (BLOCK_N,), mask (BLOCK_M, BLOCK_N)); column blocks go fastest,
    so that consecutive programs stream through memory in order."""
    n_col_blocks = tl.cdiv(n_cols, BLOCK_N)
    pid = tl.program_id(0)
    rows = (pid // n_col_blocks).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64 first: 2**31 rows or more
    cols = (pid % n_col_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    return rows, cols, (rows < n_rows)[:, None] & (cols < n_cols)[None, :]


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
    rows, cols, mask = _tile(n_rows, n_cols, BLOCK_M, BLOCK_N)
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
    rows, cols, mask = _tile(n_rows, n_cols, BLOCK_M, BLOCK_N)
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


def config_for(kind: str, override: dict | None = None) -> dict[str, int]:
    """The tunables of kernel ``kind`` ("fwd" or "bwd"), with ``override`` on top."""
    return {**CONFIGS[kind], **(override or {})}


def candidates(kind: str) -> list[dict[str, int]]:
    """Configs worth timing for kernel ``kind`` (the sweep of bench/small_ops.py): the current one, then tiles of
    2k-16k elements at 8-32 elements per thread."""
    configs = [config_for(kind)]
    for tile in (2048, 4096, 8192, 16384):
        for warps in (4, 8, 16):
            if 8 <= tile // (32 * warps) <= 32 and {"tile": tile, "warps": warps} not in configs:
                configs.append({"tile": tile, "warps": warps})
    return configs


def _launch(kind: str, n_rows: int, n_cols: int, override: dict | None) -> tuple[tuple[int], int, int, int]:
    """(grid, BLOCK_M, BLOCK_N, num_warps) of kernel ``kind`` for an (n_rows, n_cols) problem."""
    cfg = config_for(kind, override)
    divisor = n_cols & -n_cols  # largest power of two dividing n_cols
    block_n = min(_MAX_BLOCK_N, cfg["tile"], divisor if divisor >= 128 else triton.next_power_of_2(n_cols))
    block_m = max(1, min(cfg["tile"] // block_n, triton.next_power_of_2(n_rows)))
    grid = (triton.cdiv(n_rows, block_m) * triton.cdiv(n_cols, block_n),)
    return grid, block_m, block_n, cfg["warps"]


def swiglu_fwd(
    gate: torch.Tensor, up: torch.Tensor, *, shape: tuple[int, ...] | None = None, config: dict | None = None
) -> torch.Tensor:
    """gate, up: (N, I) with unit column stride (any row stride). Returns silu(gate) * up, (N, I) contiguous, or
    allocated in ``shape`` (contiguous, N * I elements: the kernel only sees memory), so that callers need no view.
    config: overrides of ``CONFIGS["fwd"]``."""
    n_rows, n_cols = gate.shape
    y = torch.empty(shape or (n_rows, n_cols), dtype=gate.dtype, device=gate.device)
    if y.numel() == 0:
        return y
    grid, block_m, block_n, num_warps = _launch("fwd", n_rows, n_cols, config)
    _swiglu_fwd_kernel[grid](
        gate, up, y, n_rows, n_cols, gate.stride(0), up.stride(0), BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps
    )
    return y


def swiglu_bwd(
    dy: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    *,
    shape: tuple[int, ...] | None = None,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """dy, gate, up: (N, I) with unit column stride. Returns (dgate, dup), each (N, I) contiguous, or allocated in
    ``shape`` (as in ``swiglu_fwd``). config: overrides of ``CONFIGS["bwd"]``."""
    n_rows, n_cols = gate.shape
    dgate = torch.empty(shape or (n_rows, n_cols), dtype=gate.dtype, device=gate.device)
    dup = torch.empty_like(dgate)
    if dgate.numel() == 0:
        return dgate, dup
    grid, block_m, block_n, num_warps = _launch("bwd", n_rows, n_cols, config)
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
