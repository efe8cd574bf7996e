"""Triton kernels that move MoE tokens between token order and expert order, with no host sync.

Permute (token order -> rows grouped by expert), deterministic: within an expert, rows keep the order of the
flattened ``(token, slot)`` index, as a stable argsort of ``topk_ids`` would give.

1. ``_moe_block_count_kernel``: for each block of ``BLOCK_N`` flattened ids, how many go to each expert.
2. torch on the (blocks, experts) counts: per-expert totals, cumulative end offsets, and for each block the
   first row of each expert that the block writes (a tiny, asynchronous scan).
3. ``_moe_slot_kernel``: a row for every ``(token, slot)``: its block's base for its expert plus the number of
   earlier entries of the same block with the same expert.
4. ``_moe_gather_kernel``: each program takes a tile of tokens x columns, reads it once and writes its K rows.

Unpermute: ``_moe_unpermute_kernel`` gathers a token's K rows, weights them (or not: the permute backward) and
sums in fp32; ``_moe_unpermute_bwd_kernel`` gives the rows' and the weights' gradients in one pass.

Ids outside ``[0, num_experts)`` are masked: they are counted nowhere, get ``row_index = -1``, write no row and
add nothing when unpermuting. Row indices outside ``[0, num_rows)`` are skipped the same way.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK_N = 128  # flattened (token, slot) entries per block of the histogram and slot kernels


def _row_tile(width: int) -> tuple[int, int, int]:
    """Tokens and columns per program (a tile of about 4096 elements) and warps, for the row-moving kernels."""
    block_h = min(max(triton.next_power_of_2(width), 16), 2048)
    return 4096 // block_h, block_h, 8


@triton.jit
def _moe_block_count_kernel(ids_ptr, counts_ptr, N, E, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr):
    """counts[b, e] = number of ids[b*BLOCK_N : (b+1)*BLOCK_N] equal to e."""
    pid = tl.program_id(0)
    idx = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    ids = tl.load(ids_ptr + idx, mask=idx < N, other=-1).to(tl.int32)
    for e0 in range(0, E, BLOCK_E):
        experts = e0 + tl.arange(0, BLOCK_E)
        hits = (ids[:, None] == experts[None, :]).to(tl.int32)
        tl.store(counts_ptr + pid * E + experts, tl.sum(hits, axis=0), mask=experts < E)


@triton.jit
def _moe_slot_kernel(ids_ptr, block_base_ptr, row_index_ptr, N, E, BLOCK_N: tl.constexpr):
    """row_index[i] = block_base[b, ids[i]] + #{j in block b, j < i, ids[j] == ids[i]} (-1 for an invalid id)."""
    pid = tl.program_id(0)
    local = tl.arange(0, BLOCK_N)
    idx = pid * BLOCK_N + local
    in_range = idx < N
    ids = tl.load(ids_ptr + idx, mask=in_range, other=-1).to(tl.int32)
    valid = in_range & (ids >= 0) & (ids < E)
    earlier_same = (ids[:, None] == ids[None, :]) & (local[None, :] < local[:, None])
    rank = tl.sum(earlier_same.to(tl.int32), axis=1)
    base = tl.load(block_base_ptr + pid * E + ids, mask=valid, other=0)
    tl.store(row_index_ptr + idx, tl.where(valid, base + rank, -1), mask=in_range)


@triton.jit
def _moe_gather_kernel(
    hidden_ptr,
    row_index_ptr,
    rows_ptr,
    T,
    H,
    K,
    stride_hidden,
    stride_rows,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """rows[row_index[t*K + k]] = hidden[t] for every slot k of token t (hidden[t] is read once)."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    token_ok = tokens < T
    tokens = tokens.to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    x = tl.load(
        hidden_ptr + tokens[:, None] * stride_hidden + cols[None, :],
        mask=token_ok[:, None] & (cols < H)[None, :],
    )
    for k in range(K):
        row = tl.load(row_index_ptr + tokens * K + k, mask=token_ok, other=-1).to(tl.int64)
        mask = (cols < H)[None, :] & (row >= 0)[:, None]  # an invalid row is not written
        tl.store(rows_ptr + row[:, None] * stride_rows + cols[None, :], x, mask=mask)


@triton.jit
def _moe_unpermute_kernel(
    rows_ptr,
    row_index_ptr,
    weights_ptr,
    out_ptr,
    T,
    H,
    K,
    num_rows,
    stride_rows,
    stride_out,
    HAS_WEIGHTS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """out[t] = sum_k weights[t, k] * rows[row_index[t*K + k]] (weights 1 without HAS_WEIGHTS), in fp32."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    token_ok = tokens < T
    tokens = tokens.to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    for k in range(K):
        row = tl.load(row_index_ptr + tokens * K + k, mask=token_ok, other=-1).to(tl.int64)
        mask = (cols < H)[None, :] & ((row >= 0) & (row < num_rows))[:, None]  # an invalid row adds nothing
        x = tl.load(rows_ptr + row[:, None] * stride_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_WEIGHTS:
            x = x * tl.load(weights_ptr + tokens * K + k, mask=token_ok, other=0.0).to(tl.float32)[:, None]
        acc += x
    out_mask = token_ok[:, None] & (cols < H)[None, :]
    tl.store(out_ptr + tokens[:, None] * stride_out + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _moe_unpermute_bwd_kernel(
    grad_out_ptr,
    rows_ptr,
    row_index_ptr,
    weights_ptr,
    grad_rows_ptr,
    grad_weights_ptr,
    T,
    H,
    K,
    num_rows,
    stride_grad_out,
    stride_rows,
    stride_grad_rows,
    ROWS_GRAD: tl.constexpr,
    WEIGHTS_GRAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """grad_rows[r] = w[t, k] * grad_out[t] and grad_weights[t, k] = <rows[r], grad_out[t]>, r = row_index[t*K + k]."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    token_ok = tokens < T
    tokens = tokens.to(tl.int64)
    for k in range(K):
        row = tl.load(row_index_ptr + tokens * K + k, mask=token_ok, other=-1).to(tl.int64)
        valid = (row >= 0) & (row < num_rows)  # an invalid row gets and gives nothing
        w = tl.load(weights_ptr + tokens * K + k, mask=token_ok, other=0.0).to(tl.float32)
        dot = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            cols = h0 + tl.arange(0, BLOCK_H)
            mask = (cols < H)[None, :] & valid[:, None]
            g = tl.load(grad_out_ptr + tokens[:, None] * stride_grad_out + cols[None, :], mask=mask, other=0.0)
            g = g.to(tl.float32)
            if ROWS_GRAD:
                tl.store(
                    grad_rows_ptr + row[:, None] * stride_grad_rows + cols[None, :],
                    (w[:, None] * g).to(grad_rows_ptr.dtype.element_ty),
                    mask=mask,
                )
            if WEIGHTS_GRAD:
                x = tl.load(rows_ptr + row[:, None] * stride_rows + cols[None, :], mask=mask, other=0.0)
                dot += x.to(tl.float32) * g
        if WEIGHTS_GRAD:
            grad_w = tl.sum(dot, axis=1).to(grad_weights_ptr.dtype.element_ty)
            tl.store(grad_weights_ptr + tokens * K + k, grad_w, mask=token_ok)


def permute(
    hidden: torch.Tensor, topk_ids: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows grouped by expert: returns ``rows (T*K, H)``, ``expert_offsets (E,) int32`` (cumulative ends),
    ``row_index (T*K,) int32`` and ``tokens_per_expert (E,) int64``.

    hidden: (T, H); topk_ids: (T, K) int32/int64. Inputs are assumed validated; ids outside ``[0, E)`` are masked.
    """
    num_tokens, width = hidden.shape
    topk = topk_ids.shape[1]
    n = num_tokens * topk
    hidden = hidden if hidden.stride(1) == 1 else hidden.contiguous()
    ids = topk_ids.reshape(-1).contiguous()
    device = hidden.device
    num_blocks = triton.cdiv(n, _BLOCK_N)
    counts = torch.empty((num_blocks, num_experts), dtype=torch.int32, device=device)
    row_index = torch.empty(n, dtype=torch.int32, device=device)
    rows = torch.empty((n, width), dtype=hidden.dtype, device=device)
    if n == 0:
        tokens_per_expert = torch.zeros(num_experts, dtype=torch.int64, device=device)
        return rows, tokens_per_expert.to(torch.int32), row_index, tokens_per_expert
    block_e = min(max(triton.next_power_of_2(num_experts), 16), 128)
    _moe_block_count_kernel[(num_blocks,)](ids, counts, n, num_experts, BLOCK_N=_BLOCK_N, BLOCK_E=block_e)
    tokens_per_expert = counts.sum(0)
    ends = tokens_per_expert.cumsum(0)
    block_base = counts.cumsum(0, dtype=torch.int32) - counts + (ends - tokens_per_expert).to(torch.int32)
    _moe_slot_kernel[(num_blocks,)](ids, block_base, row_index, n, num_experts, BLOCK_N=_BLOCK_N)
    block_t, block_h, warps = _row_tile(width)
    grid = (triton.cdiv(num_tokens, block_t), triton.cdiv(width, block_h))
    _moe_gather_kernel[grid](
        hidden,
        row_index,
        rows,
        num_tokens,
        width,
        topk,
        hidden.stride(0),
        rows.stride(0),
        BLOCK_T=block_t,
        BLOCK_H=block_h,
        num_warps=warps,
    )
    return rows, ends.to(torch.int32), row_index, tokens_per_expert


def unpermute(
    rows: torch.Tensor, row_index: torch.Tensor, weights: torch.Tensor | None, num_tokens: int, topk: int
) -> torch.Tensor:
    """``out (num_tokens, H)``: out[t] = sum_k weights[t, k] * rows[row_index[t*K + k]] (no weights: plain sum).

    rows: (R, H); row_index: (num_tokens*topk,) int contiguous; weights: (num_tokens, topk) or None. The output has
    rows' dtype; the sum is taken in fp32.
    """
    width = rows.shape[1]
    rows = rows if rows.stride(1) == 1 else rows.contiguous()
    out = torch.empty((num_tokens, width), dtype=rows.dtype, device=rows.device)
    if num_tokens == 0:
        return out
    weights_arg = rows if weights is None else weights.contiguous()
    block_t, block_h, warps = _row_tile(width)
    grid = (triton.cdiv(num_tokens, block_t), triton.cdiv(width, block_h))
    _moe_unpermute_kernel[grid](
        rows,
        row_index,
        weights_arg,
        out,
        num_tokens,
        width,
        topk,
        rows.shape[0],
        rows.stride(0),
        out.stride(0),
        HAS_WEIGHTS=weights is not None,
        BLOCK_T=block_t,
        BLOCK_H=block_h,
        num_warps=warps,
    )
    return out


def unpermute_backward(
    grad_out: torch.Tensor,
    rows: torch.Tensor,
    row_index: torch.Tensor,
    weights: torch.Tensor,
    *,
    rows_grad: bool,
    weights_grad: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``unpermute`` with respect to ``rows (R, H)`` and ``weights (T, K)`` (None where not asked).

    A row that no ``(token, slot)`` refers to gets a zero gradient, except when ``R == T*K`` (every row is
    referred to once when all ids are valid): then such rows are left unwritten.
    """
    num_tokens, topk = weights.shape
    num_rows, width = rows.shape
    grad_out = grad_out if grad_out.stride(1) == 1 else grad_out.contiguous()
    rows = rows if rows.stride(1) == 1 else rows.contiguous()
    weights = weights.contiguous()
    alloc = torch.empty if num_rows == num_tokens * topk else torch.zeros
    grad_rows = alloc((num_rows, width), dtype=rows.dtype, device=rows.device) if rows_grad else None
    grad_weights = torch.empty_like(weights) if weights_grad else None
    if num_tokens == 0 or not (rows_grad or weights_grad):
        return grad_rows, grad_weights
    block_t, block_h, warps = _row_tile(width)
    _moe_unpermute_bwd_kernel[(triton.cdiv(num_tokens, block_t),)](
        grad_out,
        rows,
        row_index,
        weights,
        grad_rows if rows_grad else rows,
        grad_weights if weights_grad else weights,
        num_tokens,
        width,
        topk,
        num_rows,
        grad_out.stride(0),
        rows.stride(0),
        grad_rows.stride(0) if rows_grad else 0,
        ROWS_GRAD=rows_grad,
        WEIGHTS_GRAD=weights_grad,
        BLOCK_T=block_t,
        BLOCK_H=block_h,
        num_warps=warps,
    )
    return grad_rows, grad_weights
