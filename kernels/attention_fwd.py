"""Triton forward kernel of packed varlen attention, and the block-range and mask helpers the backward shares.

Layout: ``q (total_q, num_q_heads, head_dim)``, ``k``/``v`` ``(total_k, num_kv_heads, head_dim)`` with unit stride
on the last dim; documents are delimited by ``cu_seqlens_q``/``cu_seqlens_k``. Query ``i`` of a document sees key
``j`` iff ``i + off - window_left <= j <= i + off + window_right`` with ``off = seqlen_k - seqlen_q`` (bottom-right
alignment, like flash-attn; an unlimited side is a compile-time flag off). Scores live in the log2 domain
(``qk_scale = softmax_scale * log2(e)``) so the softmax uses ``exp2``.

One program computes one ``BLOCK_M`` block of queries of one document for one query head. Programs are launched
as ``(num_q_heads, num_docs, cdiv(max_seqlen_q, BLOCK_M))``: blocks past a document's end exit at once, and the
block index is taken in reverse so the first programs take the last (causally heaviest) block of each document.
Key blocks that every query of the block sees entirely are processed without any mask; only the blocks on a
window edge (the causal diagonal) or past the end of the document are masked.
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _visible(
    rows, cols, seqlen_q, seqlen_k, off, window_left, window_right, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr
):
    """Boolean mask of visible (row, col) pairs; ``rows``/``cols`` are broadcastable document-local indices."""
    keep = (rows < seqlen_q) & (cols < seqlen_k)
    if HAS_RIGHT:
        keep = keep & (cols <= rows + off + window_right)
    if HAS_LEFT:
        keep = keep & (cols >= rows + off - window_left)
    return keep


@triton.jit
def _key_block_range(
    m0,
    seqlen_q,
    seqlen_k,
    window_left,
    window_right,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
):
    """Key blocks for the query block starting at ``m0``: ``[b_lo, f_lo)`` masked, ``[f_lo, f_hi)`` unmasked,
    ``[f_hi, b_hi)`` masked. Blocks outside ``[b_lo, b_hi)`` hold no key any query of the block sees."""
    off = seqlen_k - seqlen_q
    m_last = tl.minimum(m0 + BLOCK_M, seqlen_q) - 1
    lo = m0 * 0
    hi = seqlen_k
    full_lo = m0 * 0
    full_hi = seqlen_k // BLOCK_N
    if HAS_LEFT:
        lo = tl.maximum(m0 + off - window_left, 0)
        full_lo = tl.cdiv(tl.maximum(m_last + off - window_left, 0), BLOCK_N)
    if HAS_RIGHT:
        hi = tl.minimum(tl.maximum(m_last + off + window_right + 1, 0), seqlen_k)
        full_hi = tl.minimum(full_hi, tl.maximum(m0 + off + window_right + 1, 0) // BLOCK_N)
    b_lo = lo // BLOCK_N
    b_hi = tl.maximum(tl.cdiv(hi, BLOCK_N), b_lo)
    f_lo = tl.minimum(tl.maximum(full_lo, b_lo), b_hi)
    f_hi = tl.minimum(tl.maximum(full_hi, f_lo), b_hi)
    return b_lo, f_lo, f_hi, b_hi


@triton.jit
def _fwd_block(
    acc,
    l_i,
    m_i,
    q,
    k_ptrs,
    v_ptrs,
    rows,
    cols,
    seqlen_q,
    seqlen_k,
    off,
    window_left,
    window_right,
    qk_scale,
    MASKED: tl.constexpr,
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One online-softmax step over one key block (``k_ptrs``/``v_ptrs``: (BLOCK_N, HEAD_DIM) pointers).
    ``rows``: (BLOCK_M,), ``cols``: (BLOCK_N,) document-local indices."""
    if MASKED:
        k = tl.load(k_ptrs, mask=(cols < seqlen_k)[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=(cols < seqlen_k)[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if MASKED:
        keep = _visible(
            rows[:, None], cols[None, :], seqlen_q, seqlen_k, off, window_left, window_right, HAS_LEFT, HAS_RIGHT
        )
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw no key yet: keep p = 0, not NaN
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = m_new
    p = tl.exp2(s - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _attn_fwd_kernel(
    Q,
    K,
    V,
    OUT,
    LSE,
    CU_Q,
    CU_K,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    total_q,
    qk_scale,
    window_left,
    window_right,
    group_size,
    seqlen_bucket,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """OUT = softmax(Q K^T * scale) V per document and head; LSE (num_q_heads, total_q) fp32, natural log,
    +inf for a query that sees no key (its output row is 0). ``seqlen_bucket`` only keys the autotuner."""
    head = tl.program_id(0)
    doc = tl.program_id(1)
    q_start = tl.load(CU_Q + doc)
    seqlen_q = tl.load(CU_Q + doc + 1) - q_start
    num_m = tl.cdiv(seqlen_q, BLOCK_M)
    block = num_m - 1 - tl.program_id(2)
    if block < 0:
        return
    k_start = tl.load(CU_K + doc)
    seqlen_k = tl.load(CU_K + doc + 1) - k_start
    off = seqlen_k - seqlen_q
    kv_head = head // group_size
    m0 = block * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = rows < seqlen_q
    q_rows = q_start.to(tl.int64) + rows
    q = tl.load(Q + q_rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :], mask=row_ok[:, None], other=0.0)

    b_lo, f_lo, f_hi, b_hi = _key_block_range(
        m0, seqlen_q, seqlen_k, window_left, window_right, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT
    )
    k_first = k_start.to(tl.int64) + b_lo * BLOCK_N
    k_ptrs = K + k_first * stride_kt + kv_head * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :]
    v_ptrs = V + k_first * stride_vt + kv_head * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :]

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for nb in range(b_lo, f_lo):
        acc, l_i, m_i = _fwd_block(
            acc,
            l_i,
            m_i,
            q,
            k_ptrs,
            v_ptrs,
            rows,
            nb * BLOCK_N + offs_n,
            seqlen_q,
            seqlen_k,
            off,
            window_left,
            window_right,
            qk_scale,
            True,
            HAS_LEFT,
            HAS_RIGHT,
            DOT_PRECISION,
        )
        k_ptrs += BLOCK_N * stride_kt
        v_ptrs += BLOCK_N * stride_vt
    for nb in range(f_lo, f_hi):
        acc, l_i, m_i = _fwd_block(
            acc,
            l_i,
            m_i,
            q,
            k_ptrs,
            v_ptrs,
            rows,
            nb * BLOCK_N + offs_n,
            seqlen_q,
            seqlen_k,
            off,
            window_left,
            window_right,
            qk_scale,
            False,
            HAS_LEFT,
            HAS_RIGHT,
            DOT_PRECISION,
        )
        k_ptrs += BLOCK_N * stride_kt
        v_ptrs += BLOCK_N * stride_vt
    for nb in range(f_hi, b_hi):
        acc, l_i, m_i = _fwd_block(
            acc,
            l_i,
            m_i,
            q,
            k_ptrs,
            v_ptrs,
            rows,
            nb * BLOCK_N + offs_n,
            seqlen_q,
            seqlen_k,
            off,
            window_left,
            window_right,
            qk_scale,
            True,
            HAS_LEFT,
            HAS_RIGHT,
            DOT_PRECISION,
        )
        k_ptrs += BLOCK_N * stride_kt
        v_ptrs += BLOCK_N * stride_vt

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * LN2, float("inf"))
    tl.store(
        OUT + q_rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
        out.to(OUT.dtype.element_ty),
        mask=row_ok[:, None],
    )
    tl.store(LSE + head.to(tl.int64) * total_q + q_rows, lse, mask=row_ok)
