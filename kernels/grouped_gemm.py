"""Triton grouped GEMMs over contiguous row groups (one group per expert), with no host sync.

Groups are given as ``offsets (E,) int32``: cumulative end rows, group e is rows ``[offsets[e-1], offsets[e])``
(``offsets[-1] = 0``), as for ``torch._grouped_mm``.

- ``grouped_mm(x, w, offsets)``: ``out[g_e] = x[g_e] @ w[e]`` (forward, and the input gradient with ``w``
  transposed). Each program finds its (expert, row tile) from a prefix sum of per-expert tile counts that it
  computes itself; the grid is the upper bound ``cdiv(M, BLOCK_M) + E`` row tiles, surplus programs return.
- ``grouped_mm_wgrad(a, b, offsets)``: ``out[e] = a[g_e].T @ b[g_e]`` (the weight gradient); an expert with
  no rows gets zeros.
- ``zero_rows_from(x, end)``: zeros the rows of ``x`` from a device count on (the input gradients of rows past the
  last group, which the GEMMs leave unwritten).

Rows at or beyond ``offsets[-1]`` take no part: their outputs are left unwritten. Products accumulate in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _config(dtype: torch.dtype) -> dict:
    """Tile sizes: big tensor-core tiles for 16-bit inputs, smaller ones for fp32 (exact, not tf32)."""
    if dtype == torch.float32:
        return {"BLOCK_A": 64, "BLOCK_B": 64, "BLOCK_C": 32, "num_warps": 4, "num_stages": 2}
    return {"BLOCK_A": 128, "BLOCK_B": 128, "BLOCK_C": 64, "num_warps": 8, "num_stages": 3}


def _check_rows(op: str, num_rows: int, cfg: dict) -> None:
    """Row indices within the groups are int32 (the offsets are int32, and a tile's indices run up to a tile past
    the last group's end): ValueError for more rows than they hold."""
    limit = 2**31 - 1 - max(cfg["BLOCK_A"], cfg["BLOCK_C"])
    if num_rows > limit:
        raise ValueError(f"{op}: at most {limit} rows (int32 expert offsets), got {num_rows}")


@triton.jit
def _grouped_mm_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    offsets_ptr,
    N,
    K,
    E,
    stride_xm,
    stride_xk,
    stride_we,
    stride_wk,
    stride_wn,
    stride_om,
    stride_on,
    BLOCK_A: tl.constexpr,  # rows (M) per tile
    BLOCK_B: tl.constexpr,  # columns (N) per tile
    BLOCK_C: tl.constexpr,  # reduction (K) per step
    BLOCK_E: tl.constexpr,
):
    """out[rows of expert e] = x[rows of expert e] @ w[e]; x: (M, K), w: (E, K, N), out: (M, N)."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_B)
    pid_m = pid // num_n
    pid_n = pid % num_n

    experts = tl.arange(0, BLOCK_E)
    in_e = experts < E
    ends = tl.load(offsets_ptr + experts, mask=in_e, other=0)
    starts = tl.load(offsets_ptr + experts - 1, mask=in_e & (experts > 0), other=0)
    tiles = tl.where(in_e, tl.cdiv(tl.maximum(ends - starts, 0), BLOCK_A), 0)
    tile_ends = tl.cumsum(tiles, axis=0)
    e = tl.sum((tile_ends <= pid_m).to(tl.int32), axis=0)
    if e >= E:
        return
    this = experts == e
    row_start = tl.sum(tl.where(this, starts, 0), axis=0)
    row_end = tl.sum(tl.where(this, ends, 0), axis=0)
    first_tile = tl.sum(tl.where(this, tile_ends - tiles, 0), axis=0)

    rows = row_start + (pid_m - first_tile) * BLOCK_A + tl.arange(0, BLOCK_A)
    row_mask = rows < row_end
    cols = pid_n * BLOCK_B + tl.arange(0, BLOCK_B)
    col_mask = cols < N
    red = tl.arange(0, BLOCK_C)
    # Offsets and steps in int64, all computed before the loop: rows of x (M * K can pass 2**31 elements) and one
    # expert's weight as well (a (K, N) matrix of 2**31 elements or more, e.g. a (V, H) = (262145, 8192) weight
    # passed transposed, has column offsets cols * K past 2**31).
    red64 = red.to(tl.int64)
    x_ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_xm + red64[None, :] * stride_xk
    w_ptrs = w_ptr + e.to(tl.int64) * stride_we + red64[:, None] * stride_wk + cols.to(tl.int64)[None, :] * stride_wn
    x_step = tl.cast(stride_xk, tl.int64) * BLOCK_C
    w_step = tl.cast(stride_wk, tl.int64) * BLOCK_C
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_C):
        red_mask = (k0 + red) < K
        a = tl.load(x_ptrs, mask=row_mask[:, None] & red_mask[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=red_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision="ieee")
        x_ptrs += x_step
        w_ptrs += w_step
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _grouped_mm_wgrad_kernel(
    a_ptr,
    b_ptr,
    out_ptr,
    offsets_ptr,
    P,
    Q,
    stride_am,
    stride_ap,
    stride_bm,
    stride_bq,
    stride_oe,
    stride_op,
    stride_oq,
    BLOCK_A: tl.constexpr,  # P per tile
    BLOCK_B: tl.constexpr,  # Q per tile
    BLOCK_C: tl.constexpr,  # rows (the reduction) per step
):
    """out[e] = a[rows of e].T @ b[rows of e]; a: (M, P), b: (M, Q), out: (E, P, Q); zeros for an empty expert."""
    pid = tl.program_id(0)
    num_p = tl.cdiv(P, BLOCK_A)
    num_q = tl.cdiv(Q, BLOCK_B)
    e = pid // (num_p * num_q)
    tile = pid % (num_p * num_q)
    ps = (tile // num_q) * BLOCK_A + tl.arange(0, BLOCK_A)
    qs = (tile % num_q) * BLOCK_B + tl.arange(0, BLOCK_B)
    p_mask = ps < P
    q_mask = qs < Q
    start = tl.load(offsets_ptr + e - 1, mask=e > 0, other=0)
    end = tl.load(offsets_ptr + e)
    red = tl.arange(0, BLOCK_C)
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_C):
        rows = m0 + red
        row_mask = rows < end
        rows64 = rows.to(tl.int64)
        at = tl.load(
            a_ptr + rows64[None, :] * stride_am + ps[:, None] * stride_ap,
            mask=p_mask[:, None] & row_mask[None, :],
            other=0.0,
        )
        bt = tl.load(
            b_ptr + rows64[:, None] * stride_bm + qs[None, :] * stride_bq,
            mask=row_mask[:, None] & q_mask[None, :],
            other=0.0,
        )
        acc = tl.dot(at, bt, acc, input_precision="ieee")
    # int64 within an expert's (P, Q) block too: P * Q can pass 2**31 (once, after the loop)
    out_ptrs = out_ptr + e.to(tl.int64) * stride_oe + ps.to(tl.int64)[:, None] * stride_op + qs[None, :] * stride_oq
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=p_mask[:, None] & q_mask[None, :])


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``out (M, N)``: rows of expert e of ``x (M, K)`` times ``w[e]`` (``w: (E, K, N)``, any strides).

    ``offsets (E,) int32`` are cumulative end rows; rows at or beyond ``offsets[-1]`` are left unwritten.
    """
    num_rows, red = x.shape
    num_experts, _, n = w.shape
    cfg = _config(x.dtype)
    _check_rows("grouped_mm", num_rows, cfg)
    out = torch.empty((num_rows, n), dtype=x.dtype, device=x.device)
    if num_rows == 0 or n == 0:
        return out
    tiles_m = triton.cdiv(num_rows, cfg["BLOCK_A"]) + num_experts
    grid = (tiles_m * triton.cdiv(n, cfg["BLOCK_B"]),)
    _grouped_mm_kernel[grid](
        x,
        w,
        out,
        offsets,
        n,
        red,
        num_experts,
        x.stride(0),
        x.stride(1),
        w.stride(0),
        w.stride(1),
        w.stride(2),
        out.stride(0),
        out.stride(1),
        BLOCK_E=max(triton.next_power_of_2(num_experts), 16),
        **cfg,
    )
    return out


def grouped_mm_wgrad(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``out (E, P, Q)``: ``out[e] = a[g_e].T @ b[g_e]`` for ``a: (M, P)``, ``b: (M, Q)``; zeros for empty groups."""
    p = a.shape[1]
    q = b.shape[1]
    num_experts = offsets.shape[0]
    cfg = _config(a.dtype)
    _check_rows("grouped_mm_wgrad", a.shape[0], cfg)
    out = torch.empty((num_experts, p, q), dtype=a.dtype, device=a.device)
    if out.numel() == 0:
        return out
    grid = (num_experts * triton.cdiv(p, cfg["BLOCK_A"]) * triton.cdiv(q, cfg["BLOCK_B"]),)
    _grouped_mm_wgrad_kernel[grid](
        a,
        b,
        out,
        offsets,
        p,
        q,
        a.stride(0),
        a.stride(1),
        b.stride(0),
        b.stride(1),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        **cfg,
    )
    return out


@triton.jit
def _zero_rows_kernel(x_ptr, end_ptr, M, N, stride_m, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """x[end:M] = 0, end read at ``end_ptr``; programs whose rows all lie before ``end`` exit at once."""
    end = tl.load(end_ptr)
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_M  # int64: x may have 2**31 rows or more
    if row0 + BLOCK_M <= end:
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = (rows >= end) & (rows < M)
    ptrs = x_ptr + rows[:, None] * stride_m + tl.arange(0, BLOCK_N)[None, :]
    zeros = tl.zeros([BLOCK_M, BLOCK_N], dtype=x_ptr.dtype.element_ty)
    for n0 in range(0, N, BLOCK_N):
        tl.store(ptrs + n0, zeros, mask=row_ok[:, None] & ((n0 + tl.arange(0, BLOCK_N)) < N)[None, :])


def zero_rows_from(x: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """Zero rows ``end[0]:`` of ``x (M, N)`` (unit column stride) in place, with no host sync; ``end``: a
    one-element int32 device tensor, e.g. ``offsets[-1:]``. Returns ``x``."""
    num_rows, n = x.shape
    if x.numel() == 0:
        return x
    block_n = min(triton.next_power_of_2(n), 256)
    block_m = max(1, 4096 // block_n)
    _zero_rows_kernel[(triton.cdiv(num_rows, block_m),)](
        x, end, num_rows, n, x.stride(0), BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4
    )
    return x
