"""Triton kernels of RMSNorm (optionally fused with the residual add) and their host launchers.

Forward: one program normalises ``BLOCK_M`` rows of ``BLOCK_N = next_power_of_2(H)`` columns (several rows per
program only when H is small), in fp32, and rounds once to the output dtype. Backward: a persistent grid of a few
programs per SM walks the rows, writes ``dx`` and keeps a fp32 partial sum of ``dweight`` per program; the host
adds the partials. ``rstd`` is recomputed in the backward from ``h`` (which it reads anyway), so the forward writes
no statistics.
"""

import torch
import triton
import triton.language as tl

# Widest row a program holds in registers; wider rows would need a loop over column blocks.
MAX_HIDDEN = 65536
# Elements per program tile that the launch heuristics aim for.
_TILE_ELEMENTS = 4096


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
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    mask = (rows < n_rows)[:, None] & col_mask[None, :]
    offs = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
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
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    y = h * rstd[:, None] * w[None, :]
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


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
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for row_start in range(pid * BLOCK_M, n_rows, tl.num_programs(0) * BLOCK_M):
        rows = row_start + tl.arange(0, BLOCK_M)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & col_mask[None, :]
        offs = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
        h = tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        # Rows past the end get rstd 0, so they add nothing (not NaN) to dweight even when eps is 0.
        rstd = tl.where(row_mask, tl.rsqrt(tl.sum(h * h, axis=1) / n_cols + eps), 0.0)
        n = h * rstd[:, None]
        dn = dy * w[None, :]
        c = tl.sum(dn * n, axis=1) / n_cols
        dh = (dn - n * c[:, None]) * rstd[:, None]
        if HAS_DH_OUT:
            dh += tl.load(dh_out_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + offs, dh.to(dx_ptr.dtype.element_ty), mask=mask)
        dw_acc += tl.sum(dy * n, axis=0)
    tl.store(dw_partial_ptr + pid.to(tl.int64) * n_cols + cols, dw_acc, mask=col_mask)


def _blocks(n_rows: int, n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for rows of ``n_cols`` elements."""
    block_n = triton.next_power_of_2(n_cols)
    block_m = max(1, min(_TILE_ELEMENTS // block_n, triton.next_power_of_2(n_rows)))
    num_warps = min(16, max(1, block_m * block_n // 512))
    return block_m, block_n, num_warps


def _num_persistent_programs(device: torch.device) -> int:
    """Size of the persistent backward grid: a few programs per SM (a handful under the interpreter)."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def rms_norm_fwd(
    x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None, eps: float, out_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the forward.

    x, residual: (N, H) contiguous; weight: (H,). Returns y (N, H) in ``out_dtype`` and, with a residual,
    h = x + residual (N, H) in x's dtype (else None).
    """
    n_rows, n_cols = x.shape
    y = torch.empty((n_rows, n_cols), dtype=out_dtype, device=x.device)
    h = torch.empty_like(x) if residual is not None else None
    if n_rows == 0:
        return y, h
    block_m, block_n, num_warps = _blocks(n_rows, n_cols)
    _rms_norm_fwd_kernel[(triton.cdiv(n_rows, block_m),)](
        x,
        residual if residual is not None else x,
        weight,
        y,
        h if h is not None else y,
        n_rows,
        n_cols,
        eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=num_warps,
    )
    return y, h


def rms_norm_bwd(
    dy: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, dh_out: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward.

    dy: (N, H) gradient of y; h: (N, H) the normalised input; dh_out: (N, H) gradient of the returned residual
    sum, or None; all contiguous. Returns dx (N, H) in h's dtype (also the residual's gradient) and dweight (H,)
    in weight's dtype, accumulated in fp32.
    """
    n_rows, n_cols = h.shape
    dx = torch.empty_like(h)
    if n_rows == 0:
        return dx, torch.zeros_like(weight)
    block_m, block_n, num_warps = _blocks(n_rows, n_cols)
    grid = min(triton.cdiv(n_rows, block_m), _num_persistent_programs(h.device))
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
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=num_warps,
    )
    return dx, dw_partial.sum(0).to(weight.dtype)
