"""Triton forward kernel of packed varlen attention, and what the backward shares with it: the tile schedule,
block ranges, the visibility mask and tile loads.

Layout: ``q (total_q, num_q_heads, head_dim)``, ``k``/``v`` ``(total_k, num_kv_heads, head_dim)`` with unit stride
on the last dim; documents are delimited by ``cu_seqlens_q``/``cu_seqlens_k``. Query ``i`` of a document sees key
``j`` iff ``i + off - window_left <= j <= i + off + window_right`` with ``off = seqlen_k - seqlen_q`` (bottom-right
alignment, like flash-attn; an unlimited side is a compile-time flag off). Scores live in the log2 domain
(``qk_scale = softmax_scale * log2(e)``; ``NEG_SCALE`` says it is negative) so the softmax uses ``exp2``.

Schedule: ``_schedule_kernel`` writes a table of the (document, block) tiles that exist, heaviest first: tiles are
grouped by their rank inside the document (for causal attention the number of blocks they visit), ranks in
decreasing order. Kernels run a 1-D grid ``num_slots * num_heads``; program ``p`` takes tile ``p // num_heads``
for head ``p % num_heads`` (so the query heads of one GQA group, which read the same K/V, run side by side), and
slots past the last tile exit at once. The table holds each tile's document bounds, so a program needs one round
of loads before its first tile load, and no empty (document, block) programs are launched.

Tile loads go through TMA tensor descriptors over the 2-D view ``(tokens, heads * head_dim)`` (``USE_TMA``) or
through pointers. A TMA tile that runs past its document reads the next document's rows, and past the tensor
zeros; those rows are kept out of every result by the masks (keys) or never stored (queries). That holds for finite
values only: a NaN or inf in those rows reaches this document through ``0 * NaN`` in the ``P V`` (and backward)
products. Zeroing those rows with ``tl.where`` kept documents apart, but at a cost (anchor mix, H200, 2026-11-30,
against fwd 1.28 and fwd+bwd 5.18-5.23 ms): on every masked load (the last partial query block of the dK/dV kernel
left unmasked) fwd 1.35 and fwd+bwd 8.68 ms; only on the operands that need it (V in the forward, K in dQ with dS
masked, Q and dO in dK/dV, whose partial last query block is then masked) and only in masked blocks, fwd 1.99 and
fwd+bwd 8.21 ms. So the pointer path alone zero-fills them (masked loads, ``other=0``).

Measured at the anchor mix (d=128, H200, triton 3.6, 2026-11-29) and not kept, against 1.31 ms for this kernel:
rescaling the accumulator only when a row max grows by more than 8 (log2 units; a block-wide branch) took 1.62
instead of 1.51 ms in the same probe kernel, and issuing the next block's Q K^T before this block's P V (the loop
rotated by hand) 1.53 ms at 64x64 tiles and 1.56 ms at 128x128; no tile config made either faster. Nor did a
persistent grid (1-8 programs per SM, each looping over the tile table): 1.31-1.94 ms against 1.30 ms, and 1.87-1.92
ms against 1.80 ms for the dQ kernel. Nor (2026-11-29, against 1.29 ms) did stacking 2 or 4 query heads of a GQA group
into one tile that shares the K/V loads (1.35-2.47 ms over 10 configs; d=64: 0.61-0.92 against 0.57 ms), a bf16
exp2 (1.31 ms, and 40% more error), or a warp-specialized key loop (fails to compile at most configs, 1.71 ms at
128x128). Without any exp2 at all the kernel takes 1.24 ms, so the exponentials are not what bounds it.
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
TILE_FIELDS = 5  # rows of the tile table: block, q_start, seqlen_q, k_start, seqlen_k


@triton.jit(do_not_specialize=["num_docs", "num_slots", "num_levels"])
def _schedule_kernel(
    CU_TILED,
    CU_Q,
    CU_K,
    TILES,
    num_docs,
    num_slots,
    num_levels,
    BLOCK: tl.constexpr,
    REVERSE: tl.constexpr,
    DOC_CHUNK: tl.constexpr,
):
    """Fill the tile table ``TILES (TILE_FIELDS, num_slots)`` int32 for the documents of ``CU_TILED`` (``CU_Q`` or
    ``CU_K``) cut into ``BLOCK`` rows. Program ``r`` writes the tiles of rank ``level = num_levels - 1 - r`` (those of
    the documents with more than ``level`` blocks), after the ``sum_d max(n_d - 1 - level, 0)`` tiles of higher rank.
    A tile's block is its rank, or with ``REVERSE`` ``n_d - 1 - rank`` (for key blocks, heaviest first when causal).
    Slots past the last tile keep their block -1 (the caller fills it)."""
    level = num_levels - 1 - tl.program_id(0)
    offs = tl.arange(0, DOC_CHUNK)
    base = level * 0
    for c in range(0, num_docs, DOC_CHUNK):
        docs = c + offs
        ok = docs < num_docs
        n = tl.cdiv(tl.load(CU_TILED + docs + 1, mask=ok, other=0) - tl.load(CU_TILED + docs, mask=ok, other=0), BLOCK)
        base += tl.sum(tl.maximum(n - 1 - level, 0), 0)
    for c in range(0, num_docs, DOC_CHUNK):
        docs = c + offs
        ok = docs < num_docs
        n = tl.cdiv(tl.load(CU_TILED + docs + 1, mask=ok, other=0) - tl.load(CU_TILED + docs, mask=ok, other=0), BLOCK)
        has = n > level
        pos = base + tl.cumsum(has.to(tl.int32), 0) - 1
        q_start = tl.load(CU_Q + docs, mask=has, other=0)
        k_start = tl.load(CU_K + docs, mask=has, other=0)
        if REVERSE:
            block = n - 1 - level
        else:
            block = n * 0 + level
        tl.store(TILES + pos, block, mask=has)
        tl.store(TILES + num_slots + pos, q_start, mask=has)
        tl.store(TILES + 2 * num_slots + pos, tl.load(CU_Q + docs + 1, mask=has, other=0) - q_start, mask=has)
        tl.store(TILES + 3 * num_slots + pos, k_start, mask=has)
        tl.store(TILES + 4 * num_slots + pos, tl.load(CU_K + docs + 1, mask=has, other=0) - k_start, mask=has)
        base += tl.sum(has.to(tl.int32), 0)


@triton.jit
def _tile(TILES, num_slots, slot):
    """(block, q_start, seqlen_q, k_start, seqlen_k) of table slot ``slot``; block -1 for an empty slot."""
    block = tl.load(TILES + slot)
    q_start = tl.load(TILES + num_slots + slot)
    seqlen_q = tl.load(TILES + 2 * num_slots + slot)
    k_start = tl.load(TILES + 3 * num_slots + slot)
    seqlen_k = tl.load(TILES + 4 * num_slots + slot)
    return block, q_start, seqlen_q, k_start, seqlen_k


@triton.jit
def _head_col(head, stride_h, USE_TMA: tl.constexpr):
    """Offset of head ``head`` within a token row, ``head * stride_h``: an int32 column for a TMA load (TMA needs
    the heads of a token side by side, so it is below heads * head_dim), else int64: a head-major layout (head
    stride ``tokens * head_dim``, e.g. a transposed ``(heads, tokens, head_dim)`` tensor) passes 2**31 once
    ``(heads - 1) * tokens * head_dim`` does."""
    if USE_TMA:
        col = head * stride_h
    else:
        col = head.to(tl.int64) * stride_h
    return col


@triton.jit
def _load_rows(
    X,
    row,
    col,
    stride_t,
    num_rows,
    BLOCK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    MASKED: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    """(BLOCK, HEAD_DIM) tile of tokens ``row .. row + BLOCK``, elements ``col .. col + HEAD_DIM`` of each token.
    With ``USE_TMA`` ``X`` is a descriptor of the 2-D view (rows past the tensor read 0); otherwise a pointer with
    token stride ``stride_t``, and with ``MASKED`` rows from ``num_rows`` on (counted from ``row``) read 0."""
    if USE_TMA:
        tile = X.load([row, col])
    else:
        offs_r = tl.arange(0, BLOCK)
        ptrs = X + row.to(tl.int64) * stride_t + col + (offs_r[:, None] * stride_t + tl.arange(0, HEAD_DIM)[None, :])
        if MASKED:
            tile = tl.load(ptrs, mask=(offs_r < num_rows)[:, None], other=0.0)
        else:
            tile = tl.load(ptrs)
    return tile


@triton.jit
def _store_rows(
    X, row, col, stride_t, tile, num_rows, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, TILE_STORE: tl.constexpr
):
    """Store ``tile`` (BLOCK, HEAD_DIM) to tokens ``row .. row + min(BLOCK, num_rows)``, elements ``col .. col +
    HEAD_DIM`` of each (token stride ``stride_t``), in ``X``'s dtype. ``TILE_STORE``: address the tile from one int64
    base with int32 offsets within it (below BLOCK * stride_t), instead of a tile of int64 pointers. ``col`` may be
    int32: the launchers allocate the outputs contiguous, so a head's offset stays below heads * head_dim."""
    offs_r = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = (offs_r < num_rows)[:, None]
    value = tile.to(X.dtype.element_ty)
    if TILE_STORE:
        base = X + row.to(tl.int64) * stride_t + col
        tl.store(base + (offs_r[:, None] * stride_t + offs_d[None, :]), value, mask=row_ok)
    else:
        rows = row.to(tl.int64) + offs_r
        tl.store(X + rows[:, None] * stride_t + col + offs_d[None, :], value, mask=row_ok)


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
def _block_range(
    r0,
    len_r,
    len_c,
    window_left,
    window_right,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
    MASK_TAIL: tl.constexpr,
):
    """Column blocks for the row block starting at ``r0``, where row ``i`` sees columns ``i + off - window_left
    .. i + off + window_right`` (``off = len_c - len_r``): ``[b_lo, f_lo)`` masked (empty without ``HAS_LEFT``),
    ``[f_lo, f_hi)`` seen whole by every row of the block, ``[f_hi, b_hi)`` masked (the right window edge, and with
    ``MASK_TAIL`` a partial last block). Queries are rows and keys columns in the forward and dQ; the dK/dV kernel
    swaps them (and the window sides)."""
    off = len_c - len_r
    r_last = tl.minimum(r0 + BLOCK_R, len_r) - 1
    lo = r0 * 0
    hi = len_c
    full_lo = r0 * 0
    if MASK_TAIL:
        full_hi = len_c // BLOCK_C
    else:
        full_hi = tl.cdiv(len_c, BLOCK_C)
    if HAS_LEFT:
        lo = tl.maximum(r0 + off - window_left, 0)
        full_lo = tl.cdiv(tl.maximum(r_last + off - window_left, 0), BLOCK_C)
    if HAS_RIGHT:
        hi = tl.minimum(tl.maximum(r_last + off + window_right + 1, 0), len_c)
        full_hi = tl.minimum(full_hi, tl.maximum(r0 + off + window_right + 1, 0) // BLOCK_C)
    b_lo = lo // BLOCK_C
    b_hi = tl.maximum(tl.cdiv(hi, BLOCK_C), b_lo)
    f_lo = tl.minimum(tl.maximum(full_lo, b_lo), b_hi)
    f_hi = tl.minimum(tl.maximum(full_hi, f_lo), b_hi)
    return b_lo, f_lo, f_hi, b_hi


@triton.jit
def _fwd_loop(
    acc,
    l_i,
    m_i,
    q,
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
    NEG_SCALE: tl.constexpr,
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
    USE_TMA: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Online softmax over key blocks ``lo .. hi`` (document-local, of BLOCK_N keys starting at token ``k_row``).
    acc: (BLOCK_M, HEAD_DIM) fp32, l_i/m_i: (BLOCK_M,) fp32 running sum and max (log2 units). Unmasked blocks fold
    the scale into one multiply-add per score; masked ones keep rows that have seen nothing at p = 0, not NaN.
    The V tile is loaded next to the K tile, before Q K^T: at the anchor mix (d=128, H200, triton 3.6) 1.29 instead
    of 1.31 ms with the load after the softmax (d=64: 0.568 instead of 0.581 ms; d=256: 2.72 instead of 2.69 ms)."""
    offs_n = tl.arange(0, BLOCK_N)
    for nb in range(lo, hi):
        n0 = nb * BLOCK_N
        k = _load_rows(K, k_row + n0, k_col, stride_kt, seqlen_k - n0, BLOCK_N, HEAD_DIM, MASKED, USE_TMA)
        v = _load_rows(V, k_row + n0, v_col, stride_vt, seqlen_k - n0, BLOCK_N, HEAD_DIM, MASKED, USE_TMA)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
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
            s = tl.where(keep, s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_use[:, None])
        else:
            if NEG_SCALE:
                m_new = tl.maximum(m_i, tl.min(s, 1) * qk_scale)
            else:
                m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            m_use = m_new
            p = tl.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["num_heads", "num_slots", "total_q", "window_left", "window_right", "group_size"])
def _attn_fwd_kernel(
    Q,
    K,
    V,
    OUT,
    LSE,
    TILES,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    num_heads,
    num_slots,
    total_q,
    qk_scale,
    window_left,
    window_right,
    group_size,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
    NEG_SCALE: tl.constexpr,
    USE_TMA: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    TILE_STORE: tl.constexpr,
):
    """OUT = softmax(Q K^T * scale) V for one BLOCK_M query tile of one head; LSE (num_q_heads, total_q) fp32,
    natural log, +inf for a query that sees no key (its output row is 0)."""
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
    q_col = _head_col(head, stride_qh, USE_TMA)
    q = _load_rows(Q, q_start + m0, q_col, stride_qt, seqlen_q - m0, BLOCK_M, HEAD_DIM, True, USE_TMA)

    b_lo, f_lo, f_hi, b_hi = _block_range(
        m0, seqlen_q, seqlen_k, window_left, window_right, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT, True
    )
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    k_col = _head_col(kv_head, stride_kh, USE_TMA)
    v_col = _head_col(kv_head, stride_vh, USE_TMA)
    # fmt: off
    if HAS_LEFT:  # the left window edge
        acc, l_i, m_i = _fwd_loop(
            acc, l_i, m_i, q, K, V, k_start, k_col, v_col, stride_kt, stride_vt, rows, seqlen_q, seqlen_k, off,
            window_left, window_right, qk_scale, b_lo, f_lo,
            BLOCK_N, HEAD_DIM, True, NEG_SCALE, HAS_LEFT, HAS_RIGHT, USE_TMA, DOT_PRECISION,
        )
    acc, l_i, m_i = _fwd_loop(
        acc, l_i, m_i, q, K, V, k_start, k_col, v_col, stride_kt, stride_vt, rows, seqlen_q, seqlen_k, off,
        window_left, window_right, qk_scale, f_lo, f_hi,
        BLOCK_N, HEAD_DIM, False, NEG_SCALE, HAS_LEFT, HAS_RIGHT, USE_TMA, DOT_PRECISION,
    )
    acc, l_i, m_i = _fwd_loop(
        acc, l_i, m_i, q, K, V, k_start, k_col, v_col, stride_kt, stride_vt, rows, seqlen_q, seqlen_k, off,
        window_left, window_right, qk_scale, f_hi, b_hi,
        BLOCK_N, HEAD_DIM, True, NEG_SCALE, HAS_LEFT, HAS_RIGHT, USE_TMA, DOT_PRECISION,
    )
    # fmt: on

    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc * (1.0 / l_safe)[:, None]
    lse = tl.where(seen, (m_i + tl.log2(l_safe)) * LN2, float("inf"))
    _store_rows(OUT, q_start + m0, head * stride_oh, stride_ot, out, seqlen_q - m0, BLOCK_M, HEAD_DIM, TILE_STORE)
    row_ok = rows < seqlen_q
    q_rows = q_start.to(tl.int64) + rows
    tl.store(LSE + head.to(tl.int64) * total_q + q_rows, lse, mask=row_ok)
