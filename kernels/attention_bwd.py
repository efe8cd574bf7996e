"""Triton backward kernels of packed varlen attention (atomics-free: every output element has one writer).

1. ``_attn_bwd_preprocess_kernel``: ``delta = rowsum(dO * O)`` per query and head, fp32 ``(num_q_heads, total_q)``.
2. ``_attn_bwd_dkdv_kernel``: one program per (KV head, document, ``BLOCK_N`` key block) loops over the query
   heads of its GQA group and over the query blocks that see the key block (fully masked blocks are skipped, the
   visited ones all go through the mask: see ``_dkdv_block``); dK and dV accumulate in registers, so repeated K/V
   are never materialized and no atomics are needed.
3. ``_attn_bwd_dq_kernel``: one program per (query head, document, ``BLOCK_M`` query block), in the forward's
   reverse order, loops over the key blocks it sees.

Both recompute ``P = exp2(S * log2(e) * scale - LSE * log2(e))`` from the saved LSE; ``dS = P * (dP - delta)``.
Block ranges follow ``attention_fwd``; the dQ kernel masks only blocks on a window edge or a document end.
"""

import triton
import triton.language as tl

from .attention_fwd import LOG2E, _key_block_range, _visible


@triton.jit
def _attn_bwd_preprocess_kernel(
    OUT, DO, DELTA, stride_ot, stride_oh, stride_dot, stride_doh, total_q, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr
):
    """DELTA[h, t] = sum_d O[t, h, d] * DO[t, h, d] in fp32, for ``BLOCK_T`` tokens of one head."""
    head = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = (rows < total_q)[:, None]
    tokens = rows.to(tl.int64)[:, None]
    o = tl.load(OUT + tokens * stride_ot + head * stride_oh + offs_d[None, :], mask=row_ok, other=0.0)
    do = tl.load(DO + tokens * stride_dot + head * stride_doh + offs_d[None, :], mask=row_ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + head.to(tl.int64) * total_q + rows, delta, mask=rows < total_q)


@triton.jit
def _query_block_range(
    n0,
    seqlen_q,
    seqlen_k,
    window_left,
    window_right,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
):
    """Query blocks ``[b_lo, b_hi)`` that see some key of the key block starting at ``n0``."""
    off = seqlen_k - seqlen_q
    n_last = tl.minimum(n0 + BLOCK_N, seqlen_k) - 1
    lo = n0 * 0
    hi = seqlen_q
    if HAS_RIGHT:  # visible iff row >= col - off - window_right
        lo = tl.maximum(n0 - off - window_right, 0)
    if HAS_LEFT:  # visible iff row <= col - off + window_left
        hi = tl.minimum(tl.maximum(n_last - off + window_left + 1, 0), seqlen_q)
    b_lo = lo // BLOCK_M
    return b_lo, tl.maximum(tl.cdiv(hi, BLOCK_M), b_lo)


@triton.jit
def _dkdv_block(
    dk,
    dv,
    k,
    v,
    q_tile,
    do_tile,
    lse_ptrs,
    delta_ptrs,
    rows,
    cols,
    seqlen_q,
    seqlen_k,
    off,
    window_left,
    window_right,
    qk_scale,
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Accumulate one query block into dK, dV (BLOCK_N, HEAD_DIM); transposed scores (BLOCK_N, BLOCK_M).
    ``q_tile``/``do_tile``: (BLOCK_M, HEAD_DIM) pointers, ``lse_ptrs``/``delta_ptrs``: (BLOCK_M,) pointers.
    Always masked: one loop with the mask keeps the kernel within the register file (three loops, as in the
    forward, made the compiler spill heavily); the mask is a few integer ops per score, the loads are per row."""
    row_ok = rows < seqlen_q
    q = tl.load(q_tile, mask=row_ok[:, None], other=0.0)
    do = tl.load(do_tile, mask=row_ok[:, None], other=0.0)
    lse = tl.load(lse_ptrs, mask=row_ok, other=float("inf"))
    delta = tl.load(delta_ptrs, mask=row_ok, other=0.0)
    s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
    p_t = tl.exp2(s_t - (lse * LOG2E)[None, :])
    keep = _visible(
        rows[None, :], cols[:, None], seqlen_q, seqlen_k, off, window_left, window_right, HAS_LEFT, HAS_RIGHT
    )
    p_t = tl.where(keep, p_t, 0.0)
    dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    CU_Q,
    CU_K,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_dot,
    stride_doh,
    stride_dkt,
    stride_dkh,
    stride_dvt,
    stride_dvh,
    total_q,
    sm_scale,
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
    """dK, dV of one ``BLOCK_N`` key block of one document for one KV head, summed over its query-head group."""
    kv_head = tl.program_id(0)
    doc = tl.program_id(1)
    k_start = tl.load(CU_K + doc)
    seqlen_k = tl.load(CU_K + doc + 1) - k_start
    n0 = tl.program_id(2) * BLOCK_N
    if n0 >= seqlen_k:
        return
    q_start = tl.load(CU_Q + doc)
    seqlen_q = tl.load(CU_Q + doc + 1) - q_start
    off = seqlen_k - seqlen_q
    cols = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = (cols < seqlen_k)[:, None]
    k_rows = k_start.to(tl.int64) + cols
    k = tl.load(K + k_rows[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :], mask=col_ok, other=0.0)
    v = tl.load(V + k_rows[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :], mask=col_ok, other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    q_offs = offs_m[:, None] * stride_qt + offs_d[None, :]
    do_offs = offs_m[:, None] * stride_dot + offs_d[None, :]

    b_lo, b_hi = _query_block_range(
        n0, seqlen_q, seqlen_k, window_left, window_right, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT
    )
    for g in range(group_size):
        head = kv_head * group_size + g
        q_head = Q + q_start.to(tl.int64) * stride_qt + head * stride_qh
        do_head = DO + q_start.to(tl.int64) * stride_dot + head * stride_doh
        lse_head = LSE + head.to(tl.int64) * total_q + q_start
        delta_head = DELTA + head.to(tl.int64) * total_q + q_start
        for mb in range(b_lo, b_hi):
            m0 = tl.cast(mb * BLOCK_M, tl.int64)
            dk, dv = _dkdv_block(
                dk,
                dv,
                k,
                v,
                q_head + m0 * stride_qt + q_offs,
                do_head + m0 * stride_dot + do_offs,
                lse_head + m0 + offs_m,
                delta_head + m0 + offs_m,
                mb * BLOCK_M + offs_m,
                cols,
                seqlen_q,
                seqlen_k,
                off,
                window_left,
                window_right,
                qk_scale,
                HAS_LEFT,
                HAS_RIGHT,
                DOT_PRECISION,
            )

    tl.store(
        DK + k_rows[:, None] * stride_dkt + kv_head * stride_dkh + offs_d[None, :],
        (dk * sm_scale).to(DK.dtype.element_ty),
        mask=col_ok,
    )
    tl.store(
        DV + k_rows[:, None] * stride_dvt + kv_head * stride_dvh + offs_d[None, :],
        dv.to(DV.dtype.element_ty),
        mask=col_ok,
    )


@triton.jit
def _dq_block(
    dq,
    q,
    do,
    lse2,
    delta,
    k_tile,
    v_tile,
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
    """Accumulate one key block (``k_tile``/``v_tile``: (BLOCK_N, HEAD_DIM) pointers) into dQ (BLOCK_M, HEAD_DIM);
    ``lse2`` is the LSE in log2 units."""
    if MASKED:
        k = tl.load(k_tile, mask=(cols < seqlen_k)[:, None], other=0.0)
        v = tl.load(v_tile, mask=(cols < seqlen_k)[:, None], other=0.0)
    else:
        k = tl.load(k_tile)
        v = tl.load(v_tile)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    p = tl.exp2(s - lse2[:, None])
    if MASKED:
        keep = _visible(
            rows[:, None], cols[None, :], seqlen_q, seqlen_k, off, window_left, window_right, HAS_LEFT, HAS_RIGHT
        )
        p = tl.where(keep, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DQ,
    CU_Q,
    CU_K,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_dot,
    stride_doh,
    stride_dqt,
    stride_dqh,
    total_q,
    sm_scale,
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
    """dQ of one ``BLOCK_M`` query block of one document for one query head."""
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
    do = tl.load(
        DO + q_rows[:, None] * stride_dot + head * stride_doh + offs_d[None, :], mask=row_ok[:, None], other=0.0
    )
    lse2 = tl.load(LSE + head.to(tl.int64) * total_q + q_rows, mask=row_ok, other=float("inf")) * LOG2E
    delta = tl.load(DELTA + head.to(tl.int64) * total_q + q_rows, mask=row_ok, other=0.0)

    b_lo, f_lo, f_hi, b_hi = _key_block_range(
        m0, seqlen_q, seqlen_k, window_left, window_right, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT
    )
    k_head = K + k_start.to(tl.int64) * stride_kt + kv_head * stride_kh
    v_head = V + k_start.to(tl.int64) * stride_vt + kv_head * stride_vh
    k_offs = offs_n[:, None] * stride_kt + offs_d[None, :]
    v_offs = offs_n[:, None] * stride_vt + offs_d[None, :]
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for nb in range(b_lo, f_lo):
        n0 = tl.cast(nb * BLOCK_N, tl.int64)
        dq = _dq_block(
            dq,
            q,
            do,
            lse2,
            delta,
            k_head + n0 * stride_kt + k_offs,
            v_head + n0 * stride_vt + v_offs,
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
    for nb in range(f_lo, f_hi):
        n0 = tl.cast(nb * BLOCK_N, tl.int64)
        dq = _dq_block(
            dq,
            q,
            do,
            lse2,
            delta,
            k_head + n0 * stride_kt + k_offs,
            v_head + n0 * stride_vt + v_offs,
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
    for nb in range(f_hi, b_hi):
        n0 = tl.cast(nb * BLOCK_N, tl.int64)
        dq = _dq_block(
            dq,
            q,
            do,
            lse2,
            delta,
            k_head + n0 * stride_kt + k_offs,
            v_head + n0 * stride_vt + v_offs,
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

    tl.store(
        DQ + q_rows[:, None] * stride_dqt + head * stride_dqh + offs_d[None, :],
        (dq * sm_scale).to(DQ.dtype.element_ty),
        mask=row_ok[:, None],
    )
