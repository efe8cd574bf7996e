"""Triton backward kernels of packed varlen attention (atomics-free: every output element has one writer).

1. ``_attn_bwd_dq_kernel``: one program per (query tile, query head), scheduled like the forward. It first computes
   ``delta = rowsum(dO * O)`` for its rows (fp32, stored in ``DELTA (num_q_heads, total_q)`` for step 2: this is
   the usual preprocessing pass, fused), then loops over the key blocks the tile sees.
2. ``_attn_bwd_dkdv_kernel``: one program per (key tile, KV head), heaviest first; it loops over the query heads
   of its GQA group and over the query blocks that see the key tile, with dK and dV in registers: repeated K/V are
   never materialized and no atomics are needed.

The fused alternative (the dK/dV kernel also adds ``dS K`` into an fp32 dQ with atomics, pointer or TMA
reductions: five matmuls per block pair instead of seven, no dQ kernel) was built and measured on an H200 with
triton 3.6: correct, but its backward took at best 1.17x as long as these two kernels at the packed anchor shape
(6 tile configs) and 1.10x at one 8192-token document with d=64 (8 configs): the atomics cost more than the
two matmuls they save. It is not kept. Nor is accumulating dK^T and dV^T (``dV^T += dO^T P``: P and dS written
to shared memory as B operands instead of being loaded back into registers as A operands): 1.23 instead of
1.14 ms at d=64 and 2.30 instead of 2.19 ms at d=128 on an H200, as triton 3.6 then waits for each accumulation
before issuing the next matmul.

Two more alternatives were measured at the packed anchor shape (d=128, 32/8 heads, H200, triton 3.6; these two kernels
take 3.93 ms there) and are not kept:
- materializing dS: a delta pass, the dK/dV kernel also stores each bf16 dS tile to a (heads, tokens, max_seqlen)
  buffer, then dQ = dS K alone (one matmul per block pair instead of three). The stores raise dK/dV from 2.28 to
  2.90 ms through TMA and 4.26 ms through pointers, and dQ = dS K still takes 0.85-1.98 ms, so the backward
  takes at best ~3.75 ms, for 4% and up to 8.6 GB of dS buffer at this shape.
- running the dQ and dK/dV kernels side by side on two streams (delta from a separate pass): 4.05 instead of
  3.93 ms (3.89 vs 3.79 ms at 16 documents of 2048): the heaviest-first schedule leaves no tail to fill.
- rotating the dK/dV loop by hand (the next step's Q K^T and dO V^T issued before this step's two accumulations):
  4.40-9.89 ms instead of 2.19 ms over five tile configs (2026-11-29); triton no longer pipelines the loads.

Both recompute ``P = exp2(S * qk_scale - LSE * log2(e))`` from the forward's LSE; ``dS = P * (dP - delta)``.
Queries past the end of a document get LSE = +inf, hence P = 0, so only the window edges (the causal diagonal)
and a partial last key block need a mask; the blocks that every row sees whole run without one.
"""

import triton
import triton.language as tl

from .attention_fwd import LOG2E, _block_range, _head_col, _load_rows, _store_rows, _tile, _visible


@triton.jit
def _dq_loop(
    dq,
    q,
    do,
    lse2,
    delta,
    K,
    V,
    k_row,
    k_col,
    v_col,
    stride_kt,
    stride_vt,
    rows,
    seqlen_q,
    seqlen_k,
    off,
    window_left,
    window_right,
    qk_scale,
    lo,
    hi,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    MASKED: tl.constexpr,
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
    USE_TMA: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Accumulate key blocks ``lo .. hi`` into dq (BLOCK_M, HEAD_DIM) fp32 (unscaled). q/do: (BLOCK_M, HEAD_DIM)
    tiles; lse2: (BLOCK_M,) LSE in log2 units; delta: (BLOCK_M,)."""
    offs_n = tl.arange(0, BLOCK_N)
    for nb in range(lo, hi):
        n0 = nb * BLOCK_N
        k = _load_rows(K, k_row + n0, k_col, stride_kt, seqlen_k - n0, BLOCK_N, HEAD_DIM, MASKED, USE_TMA)
        v = _load_rows(V, k_row + n0, v_col, stride_vt, seqlen_k - n0, BLOCK_N, HEAD_DIM, MASKED, USE_TMA)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        p = tl.exp2(s * qk_scale - lse2[:, None])
        if MASKED:
            keep = _visible(
                rows[:, None],
                (n0 + offs_n)[None, :],
                seqlen_q,
                seqlen_k,
                off,
                window_left,
                window_right,
                HAS_LEFT,
                HAS_RIGHT,
            )
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit(do_not_specialize=["num_heads", "num_slots", "total_q", "window_left", "window_right", "group_size"])
def _attn_bwd_dq_kernel(
    Q,
    K,
    V,
    OUT,
    DO,
    LSE,
    DELTA,
    DQ,
    TILES,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_dot,
    stride_doh,
    stride_dqt,
    stride_dqh,
    num_heads,
    num_slots,
    total_q,
    sm_scale,
    qk_scale,
    window_left,
    window_right,
    group_size,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
    USE_TMA: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    TILE_STORE: tl.constexpr,
):
    """DELTA and dQ of one BLOCK_M query tile of one query head."""
    pid = tl.program_id(0)
    slot = pid // num_heads
    head = pid - slot * num_heads
    block, q_start, seqlen_q, k_start, seqlen_k = _tile(TILES, num_slots, slot)
    if block < 0:
        return
    off = seqlen_k - seqlen_q
    kv_head = head // group_size
    m0 = block * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < seqlen_q
    q_row = q_start + m0
    q_col = _head_col(head, stride_qh, USE_TMA)
    do_col = _head_col(head, stride_doh, USE_TMA)
    o_col = _head_col(head, stride_oh, USE_TMA)
    q = _load_rows(Q, q_row, q_col, stride_qt, seqlen_q - m0, BLOCK_M, HEAD_DIM, True, USE_TMA)
    do = _load_rows(DO, q_row, do_col, stride_dot, seqlen_q - m0, BLOCK_M, HEAD_DIM, True, USE_TMA)
    o = _load_rows(OUT, q_row, o_col, stride_ot, seqlen_q - m0, BLOCK_M, HEAD_DIM, True, USE_TMA)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    stats = head.to(tl.int64) * total_q + q_start + rows
    tl.store(DELTA + stats, delta, mask=row_ok)
    lse2 = tl.load(LSE + stats, mask=row_ok, other=float("inf")) * LOG2E

    b_lo, f_lo, f_hi, b_hi = _block_range(
        m0, seqlen_q, seqlen_k, window_left, window_right, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT, True
    )
    k_col = _head_col(kv_head, stride_kh, USE_TMA)
    v_col = _head_col(kv_head, stride_vh, USE_TMA)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    # fmt: off
    if HAS_LEFT:  # the left window edge
        dq = _dq_loop(
            dq, q, do, lse2, delta, K, V, k_start, k_col, v_col, stride_kt, stride_vt, rows, seqlen_q, seqlen_k,
            off, window_left, window_right, qk_scale, b_lo, f_lo,
            BLOCK_N, HEAD_DIM, True, HAS_LEFT, HAS_RIGHT, USE_TMA, DOT_PRECISION,
        )
    dq = _dq_loop(
        dq, q, do, lse2, delta, K, V, k_start, k_col, v_col, stride_kt, stride_vt, rows, seqlen_q, seqlen_k, off,
        window_left, window_right, qk_scale, f_lo, f_hi,
        BLOCK_N, HEAD_DIM, False, HAS_LEFT, HAS_RIGHT, USE_TMA, DOT_PRECISION,
    )
    dq = _dq_loop(
        dq, q, do, lse2, delta, K, V, k_start, k_col, v_col, stride_kt, stride_vt, rows, seqlen_q, seqlen_k, off,
        window_left, window_right, qk_scale, f_hi, b_hi,
        BLOCK_N, HEAD_DIM, True, HAS_LEFT, HAS_RIGHT, USE_TMA, DOT_PRECISION,
    )
    # fmt: on
    _store_rows(DQ, q_row, head * stride_dqh, stride_dqt, dq * sm_scale, seqlen_q - m0, BLOCK_M, HEAD_DIM, TILE_STORE)


@triton.jit
def _dkdv_loop(
    dk,
    dv,
    k,
    v,
    Q,
    DO,
    LSE,
    DELTA,
    kv_head,
    group_size,
    total_q,
    q_start,
    stride_qt,
    stride_qh,
    stride_dot,
    stride_doh,
    cols,
    seqlen_q,
    seqlen_k,
    off,
    window_left,
    window_right,
    qk_scale,
    lo,
    hi,
    BLOCK_M: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    MASKED: tl.constexpr,
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
    USE_TMA: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    Q_ROWS: tl.constexpr,
):
    """Accumulate query blocks ``lo .. hi`` of every query head of the GQA group into dk, dv (BLOCK_N, HEAD_DIM)
    fp32, in one flat loop (heads inner; nesting a head loop around the block loops costs registers). k/v: the key
    tile; ``cols``: (BLOCK_N,) document-local key indices. Scores are (BLOCK_M, BLOCK_N) with ``Q_ROWS`` (K and V
    stay in shared memory as the B operands of Q K^T and dO V^T; P^T and dS^T are the A operands of the
    accumulations), else transposed (BLOCK_N, BLOCK_M) (K and V are A operands, held in registers). On an H200
    (triton 3.6) ``Q_ROWS`` took 1.14 instead of 1.38 ms at one 8192-token document (32/8 heads, d=64) and 2.16
    instead of 2.37 ms at the packed anchor mix (d=128), and 10.5 instead of 9.4 ms at d=256 (best configs of
    each). Both dot products of a step are issued before the exponentials, and the dK accumulation before the dV
    one: at the anchor mix 2.12-2.14 instead of 2.18-2.19 ms (d=256: 9.28 instead of 9.37-9.41 ms; d=64 the same).
    In the dQ kernel the same order (dO V^T before the exponentials) is 0-2% slower, so it keeps its order."""
    offs_m = tl.arange(0, BLOCK_M)
    mb = lo
    g = lo * 0
    for _ in range((hi - lo) * group_size):
        head = kv_head * group_size + g
        m0 = mb * BLOCK_M
        q_row = q_start + m0
        q_col = _head_col(head, stride_qh, USE_TMA)
        do_col = _head_col(head, stride_doh, USE_TMA)
        q = _load_rows(Q, q_row, q_col, stride_qt, seqlen_q - m0, BLOCK_M, HEAD_DIM, MASKED, USE_TMA)
        do = _load_rows(DO, q_row, do_col, stride_dot, seqlen_q - m0, BLOCK_M, HEAD_DIM, MASKED, USE_TMA)
        stats = head.to(tl.int64) * total_q + q_row + offs_m
        row_ok = m0 + offs_m < seqlen_q  # LSE = +inf (P = 0) past the document, which TMA tiles may reach
        lse2 = tl.load(LSE + stats, mask=row_ok, other=float("inf")) * LOG2E
        delta = tl.load(DELTA + stats, mask=row_ok, other=0.0)
        if Q_ROWS:  # scores (BLOCK_M, BLOCK_N): wide score matmuls, P and dS transposed for the accumulations
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
            p = tl.exp2(s * qk_scale - lse2[:, None])
            if MASKED:
                keep = _visible(
                    (m0 + offs_m)[:, None],
                    cols[None, :],
                    seqlen_q,
                    seqlen_k,
                    off,
                    window_left,
                    window_right,
                    HAS_LEFT,
                    HAS_RIGHT,
                )
                p = tl.where(keep, p, 0.0)
            ds = p * (dp - delta[:, None])
            dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision=DOT_PRECISION)
            dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv, input_precision=DOT_PRECISION)
        else:
            s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
            p_t = tl.exp2(s_t * qk_scale - lse2[None, :])
            if MASKED:
                keep = _visible(
                    (m0 + offs_m)[None, :],
                    cols[:, None],
                    seqlen_q,
                    seqlen_k,
                    off,
                    window_left,
                    window_right,
                    HAS_LEFT,
                    HAS_RIGHT,
                )
                p_t = tl.where(keep, p_t, 0.0)
            ds_t = p_t * (dp_t - delta[None, :])
            dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
            dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        g += 1
        wrap = g == group_size
        mb += wrap.to(tl.int32)
        g = tl.where(wrap, 0, g)
    return dk, dv


@triton.jit(do_not_specialize=["num_kv_heads", "num_slots", "total_q", "window_left", "window_right", "group_size"])
def _attn_bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    TILES,
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
    num_kv_heads,
    num_slots,
    total_q,
    sm_scale,
    qk_scale,
    window_left,
    window_right,
    group_size,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
    SPLIT_MASK: tl.constexpr,
    USE_TMA: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    TILE_STORE: tl.constexpr,
    Q_ROWS: tl.constexpr,
):
    """dK, dV of one BLOCK_N key tile of one KV head, summed over its query-head group. Without ``SPLIT_MASK`` all
    query blocks go through one masked loop (smaller code, fewer registers)."""
    pid = tl.program_id(0)
    slot = pid // num_kv_heads
    kv_head = pid - slot * num_kv_heads
    block, q_start, seqlen_q, k_start, seqlen_k = _tile(TILES, num_slots, slot)
    if block < 0:
        return
    off = seqlen_k - seqlen_q
    n0 = block * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    k_col = _head_col(kv_head, stride_kh, USE_TMA)
    v_col = _head_col(kv_head, stride_vh, USE_TMA)
    k = _load_rows(K, k_start + n0, k_col, stride_kt, seqlen_k - n0, BLOCK_N, HEAD_DIM, True, USE_TMA)
    v = _load_rows(V, k_start + n0, v_col, stride_vt, seqlen_k - n0, BLOCK_N, HEAD_DIM, True, USE_TMA)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

    # Keys are the rows here: query i sees key j iff j - off - window_right <= i <= j - off + window_left. A
    # partial last query block needs no mask when TMA loads it (its rows past the document get P = 0).
    b_lo, f_lo, f_hi, b_hi = _block_range(
        n0, seqlen_k, seqlen_q, window_right, window_left, BLOCK_N, BLOCK_M, HAS_RIGHT, HAS_LEFT, not USE_TMA
    )
    # fmt: off
    if not SPLIT_MASK:
        dk, dv = _dkdv_loop(
            dk, dv, k, v, Q, DO, LSE, DELTA, kv_head, group_size, total_q, q_start, stride_qt, stride_qh, stride_dot,
            stride_doh, cols, seqlen_q, seqlen_k, off, window_left, window_right, qk_scale, b_lo, b_hi,
            BLOCK_M, HEAD_DIM, True, HAS_LEFT, HAS_RIGHT, USE_TMA, DOT_PRECISION, Q_ROWS,
        )
    else:
        if HAS_RIGHT:  # the causal diagonal
            dk, dv = _dkdv_loop(
                dk, dv, k, v, Q, DO, LSE, DELTA, kv_head, group_size, total_q, q_start, stride_qt, stride_qh,
                stride_dot, stride_doh, cols, seqlen_q, seqlen_k, off, window_left, window_right, qk_scale, b_lo, f_lo,
                BLOCK_M, HEAD_DIM, True, HAS_LEFT, HAS_RIGHT, USE_TMA, DOT_PRECISION, Q_ROWS,
            )
        dk, dv = _dkdv_loop(
            dk, dv, k, v, Q, DO, LSE, DELTA, kv_head, group_size, total_q, q_start, stride_qt, stride_qh, stride_dot,
            stride_doh, cols, seqlen_q, seqlen_k, off, window_left, window_right, qk_scale, f_lo, f_hi,
            BLOCK_M, HEAD_DIM, False, HAS_LEFT, HAS_RIGHT, USE_TMA, DOT_PRECISION, Q_ROWS,
        )
        if HAS_LEFT or not USE_TMA:  # the left window edge, a partial last query block
            dk, dv = _dkdv_loop(
                dk, dv, k, v, Q, DO, LSE, DELTA, kv_head, group_size, total_q, q_start, stride_qt, stride_qh,
                stride_dot, stride_doh, cols, seqlen_q, seqlen_k, off, window_left, window_right, qk_scale, f_hi, b_hi,
                BLOCK_M, HEAD_DIM, True, HAS_LEFT, HAS_RIGHT, USE_TMA, DOT_PRECISION, Q_ROWS,
            )
    # fmt: on

    # fmt: off
    _store_rows(DV, k_start + n0, kv_head * stride_dvh, stride_dvt, dv, seqlen_k - n0, BLOCK_N, HEAD_DIM, TILE_STORE)
    _store_rows(
        DK, k_start + n0, kv_head * stride_dkh, stride_dkt, dk * sm_scale, seqlen_k - n0, BLOCK_N, HEAD_DIM, TILE_STORE
    )
    # fmt: on
