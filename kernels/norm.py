"""Triton kernels of RMSNorm (optionally fused with the residual add) and their host launchers.

Both kernels hold whole rows in registers (``BLOCK_N = next_power_of_2(H)``) and work on blocks of ``rows`` rows.
With ``per_sm = 0`` the grid has one program per block and no loop (the fewest registers, so the most programs
resident per SM). With ``per_sm > 0`` the grid is persistent, ``per_sm`` programs per SM, program ``p`` taking
blocks ``p, p + grid, ...``; ``stages > 1`` lets Triton prefetch the next blocks (``cp.async`` into shared memory)
while the current one is reduced and stored, so more bytes are in flight per SM than registers alone would hold.

Forward: ``h = x + residual`` rounded to x's dtype and stored (the norm reads the rounded value, as in torch),
then ``y = h * rstd * weight`` in fp32, rounded once. No statistics are stored: the backward recomputes ``rstd``
from ``h``, which it reads anyway. Backward: always persistent; each program writes ``dx`` and keeps a fp32 partial
sum of ``dweight``, which the host adds up.

Tunables per kernel and row-width class live in ``CONFIGS``; each launcher takes ``config=`` to override them
(``bench/small_ops.py --sections sweep`` uses it to time candidates; ``candidates()`` lists them).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

# Widest row a program holds in registers; wider rows would need a loop over column blocks.
MAX_HIDDEN = 65536

# Per kernel, per row-width class (the smallest key >= BLOCK_N applies; both kernels have the same keys):
# rows = rows per step, warps = warps per program, stages = pipelining depth of the loop over row blocks,
# per_sm = persistent programs per SM (0: one block per program; the backward needs per_sm >= 1).
# The 128, 2048 and 4096 entries were picked by the H200 sweep of bench/small_ops.py (best geometric mean).
CONFIGS: dict[str, dict[int, dict[str, int]]] = {
    "fwd": {
        128: {"rows": 16, "warps": 8, "stages": 1, "per_sm": 0},
        256: {"rows": 16, "warps": 8, "stages": 1, "per_sm": 0},
        512: {"rows": 8, "warps": 8, "stages": 1, "per_sm": 0},
        1024: {"rows": 4, "warps": 8, "stages": 1, "per_sm": 0},
        2048: {"rows": 1, "warps": 8, "stages": 1, "per_sm": 0},
        4096: {"rows": 2, "warps": 16, "stages": 1, "per_sm": 0},
        MAX_HIDDEN: {"rows": 1, "warps": 16, "stages": 1, "per_sm": 0},
    },
    "bwd": {  # about 8 elements per thread: the backward holds more fp32 values per element than the forward
        128: {"rows": 32, "warps": 4, "stages": 1, "per_sm": 8},
        256: {"rows": 8, "warps": 8, "stages": 1, "per_sm": 4},
        512: {"rows": 4, "warps": 8, "stages": 1, "per_sm": 4},
        1024: {"rows": 2, "warps": 8, "stages": 1, "per_sm": 4},
        2048: {"rows": 1, "warps": 8, "stages": 2, "per_sm": 8},
        4096: {"rows": 1, "warps": 16, "stages": 3, "per_sm": 2},
        MAX_HIDDEN: {"rows": 1, "warps": 16, "stages": 1, "per_sm": 2},
    },
}


@triton.jit
def _rms_norm_fwd_block(
    x_ptr,
    res_ptr,
    w_ptr,
    y_ptr,
    h_ptr,
    block,
    n_rows,
    n_cols,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Normalise rows ``[block * BLOCK_M, (block + 1) * BLOCK_M)`` (row indices int64: with narrow rows there can
    be 2**31 of them or more)."""
    rows = tl.cast(block, tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    mask = (rows < n_rows)[:, None] & col_mask[None, :]
    offs = rows[:, None] * n_cols + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + offs, mask=mask, other=0.0)
        # Rounded to the input dtype, exactly like ``x + residual`` in torch; the norm reads the rounded value.
        h = (x.to(tl.float32) + r.to(tl.float32)).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + offs, h, mask=mask)
        h = h.to(tl.float32)
    else:
        h = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(h * h, axis=1) / n_cols + eps)
    # weight is read per block (an L1/L2 hit): holding it across the loop costs registers, hence occupancy.
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    y = h * rstd[:, None] * w[None, :]
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    y_ptr,
    h_ptr,
    n_rows,
    n_cols,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PERSISTENT: tl.constexpr,
    STAGES: tl.constexpr,
):
    if PERSISTENT:
        for block in tl.range(tl.program_id(0), tl.cdiv(n_rows, BLOCK_M), tl.num_programs(0), num_stages=STAGES):
            _rms_norm_fwd_block(
                x_ptr, res_ptr, w_ptr, y_ptr, h_ptr, block, n_rows, n_cols, eps, HAS_RESIDUAL, BLOCK_M, BLOCK_N
            )
    else:  # one block per program: no loop, which keeps the register count (and so occupancy) lowest
        _rms_norm_fwd_block(
            x_ptr, res_ptr, w_ptr, y_ptr, h_ptr, tl.program_id(0), n_rows, n_cols, eps, HAS_RESIDUAL, BLOCK_M, BLOCK_N
        )


@triton.jit
def _rms_norm_bwd_block(
    dy_ptr,
    h_ptr,
    w_ptr,
    dh_out_ptr,
    dx_ptr,
    block,
    n_rows,
    n_cols,
    eps,
    HAS_DH_OUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Write dx of rows ``[block * BLOCK_M, (block + 1) * BLOCK_M)`` (int64 indices, as in the forward); returns
    their (BLOCK_N,) dweight terms."""
    rows = tl.cast(block, tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    row_mask = rows < n_rows
    mask = row_mask[:, None] & col_mask[None, :]
    offs = rows[:, None] * n_cols + cols[None, :]
    h = tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    dn = dy * w[None, :]
    # With n = h * rstd: dh = rstd * (dn - n * mean(dn * n)) = rstd * dn - h * rstd**3 * mean(dn * h); the two row
    # sums are independent. Rows past the end get rstd 0, so they add nothing (not NaN) to dweight even when eps = 0.
    rstd = tl.where(row_mask, tl.rsqrt(tl.sum(h * h, axis=1) / n_cols + eps), 0.0)
    c = rstd * rstd * rstd * tl.sum(dn * h, axis=1) / n_cols
    dh = rstd[:, None] * dn - h * c[:, None]
    if HAS_DH_OUT:
        dh += tl.load(dh_out_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(dx_ptr + offs, dh.to(dx_ptr.dtype.element_ty), mask=mask)
    return tl.sum(dy * h * rstd[:, None], axis=0)


@triton.jit
def _rms_norm_bwd_kernel(
    dy_ptr,
    h_ptr,
    w_ptr,
    dh_out_ptr,
    dx_ptr,
    dw_partial_ptr,
    n_rows,
    n_cols,
    eps,
    HAS_DH_OUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    STAGES: tl.constexpr,
):
    pid = tl.program_id(0)
    dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for block in tl.range(pid, tl.cdiv(n_rows, BLOCK_M), tl.num_programs(0), num_stages=STAGES):
        dw_acc += _rms_norm_bwd_block(
            dy_ptr, h_ptr, w_ptr, dh_out_ptr, dx_ptr, block, n_rows, n_cols, eps, HAS_DH_OUT, BLOCK_M, BLOCK_N
        )
    cols = tl.arange(0, BLOCK_N)
    tl.store(dw_partial_ptr + pid.to(tl.int64) * n_cols + cols, dw_acc, mask=cols < n_cols)


def _block_n(n_cols: int) -> int:
    return triton.next_power_of_2(n_cols)


def table_key(n_cols: int) -> int:
    """The key of ``CONFIGS[kind]`` that applies to rows of ``n_cols`` elements."""
    widths = sorted(CONFIGS["fwd"])
    return next((width for width in widths if width >= _block_n(n_cols)), widths[-1])


def config_for(kind: str, n_cols: int, override: dict | None = None) -> dict[str, int]:
    """The tunables of kernel ``kind`` ("fwd" or "bwd") for rows of ``n_cols`` elements, with ``override`` on top."""
    config = {**CONFIGS[kind][table_key(n_cols)], **(override or {})}
    if kind == "bwd" and config["per_sm"] < 1:
        raise ValueError(f"rms_norm backward config needs per_sm >= 1 (one dweight partial per program), got {config}")
    return config


def candidates(kind: str, n_cols: int) -> list[dict[str, int]]:
    """Configs worth timing for kernel ``kind`` at row width ``n_cols`` (the sweep of bench/small_ops.py): the
    current one, steps of 2k-16k elements at 8-32 elements per thread, and pipelined persistent grids."""
    block_n = _block_n(n_cols)
    default = config_for(kind, n_cols)
    configs = [default]
    for elements in (2048, 4096, 8192, 16384):
        rows = max(1, elements // block_n)
        for warps in (4, 8, 16):
            if 8 <= rows * block_n // (32 * warps) <= 32:
                # The backward grid: as many programs as fit an SM at ~64 registers per thread.
                configs.append(
                    {"rows": rows, "warps": warps, "stages": 1, "per_sm": 0 if kind == "fwd" else 32 // warps}
                )
    per_sm = default["per_sm"] or 32 // default["warps"]
    for stages, programs in ((1, 2 * per_sm), (2, per_sm), (2, 2 * per_sm), (3, per_sm)):
        configs.append({**default, "stages": stages, "per_sm": max(1, programs)})
    unique = []
    for config in configs:
        if config not in unique:
            unique.append(config)
    return unique


@functools.cache
def _sm_count(device: torch.device) -> int:
    """SMs of a CUDA device; a small stand-in under the interpreter, so that persistent loops run several steps."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2


def _grid(n_rows: int, config: dict[str, int], device: torch.device) -> int:
    n_blocks = triton.cdiv(n_rows, config["rows"])
    return n_blocks if config["per_sm"] == 0 else min(n_blocks, config["per_sm"] * _sm_count(device))


def rms_norm_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    residual: torch.Tensor | None,
    eps: float,
    out_dtype: torch.dtype,
    *,
    shape: tuple[int, ...] | None = None,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the forward.

    x, residual: (N, H) contiguous; weight: (H,). Returns y (N, H) in ``out_dtype`` and, with a residual,
    h = x + residual (N, H) in x's dtype (else None). ``shape``: the shape to allocate them in instead of (N, H)
    (contiguous, N * H elements: the kernel only sees memory), so that callers need no view of them.
    config: overrides of ``CONFIGS["fwd"]``.
    """
    n_rows, n_cols = x.shape
    shape = shape or (n_rows, n_cols)
    y = torch.empty(shape, dtype=out_dtype, device=x.device)
    h = torch.empty(shape, dtype=x.dtype, device=x.device) if residual is not None else None
    if n_rows == 0:
        return y, h
    cfg = config_for("fwd", n_cols, config)
    _rms_norm_fwd_kernel[(_grid(n_rows, cfg, x.device),)](
        x,
        residual if residual is not None else x,
        weight,
        y,
        h if h is not None else y,
        n_rows,
        n_cols,
        eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK_M=cfg["rows"],
        BLOCK_N=_block_n(n_cols),
        PERSISTENT=cfg["per_sm"] > 0,
        STAGES=cfg["stages"],
        num_warps=cfg["warps"],
    )
    return y, h


def rms_norm_bwd(
    dy: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor,
    dh_out: torch.Tensor | None,
    eps: float,
    *,
    shape: tuple[int, ...] | None = None,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward.

    dy: (N, H) gradient of y; h: (N, H) the normalised input; dh_out: (N, H) gradient of the returned residual
    sum, or None; all contiguous. Returns dx (N, H) in h's dtype (also the residual's gradient), allocated in
    ``shape`` when given (as in ``rms_norm_fwd``), and dweight (H,) in weight's dtype, accumulated in fp32.
    config: overrides of ``CONFIGS["bwd"]``.
    """
    n_rows, n_cols = h.shape
    dx = torch.empty(shape or (n_rows, n_cols), dtype=h.dtype, device=h.device)
    if n_rows == 0:
        return dx, torch.zeros_like(weight)
    cfg = config_for("bwd", n_cols, config)
    grid = _grid(n_rows, cfg, h.device)
    dw_partial = torch.empty((grid, n_cols), dtype=torch.float32, device=h.device)
    _rms_norm_bwd_kernel[(grid,)](
        dy,
        h,
        weight,
        dh_out if dh_out is not None else dy,
        dx,
        dw_partial,
        n_rows,
        n_cols,
        eps,
        HAS_DH_OUT=dh_out is not None,
        BLOCK_M=cfg["rows"],
        BLOCK_N=_block_n(n_cols),
        STAGES=cfg["stages"],
        num_warps=cfg["warps"],
    )
    return dx, dw_partial.sum(0).to(weight.dtype)
