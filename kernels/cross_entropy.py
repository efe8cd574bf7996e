"""Row kernel and host launcher of the fused linear cross-entropy.

Design: tokens are processed in chunks of ``chunk_rows(...)`` rows. For each chunk
1. ``logits = hidden_chunk @ weight.T (+ bias)`` with cuBLAS, into a reused buffer in the input dtype;
2. ``_ce_rows_kernel`` makes two passes over each token's logits: an online logsumexp (plus the sum of logits for
   label smoothing), then, when gradients are wanted, it overwrites the logits in place with ``dloss/dlogits``
   scaled by the token's weight;
3. ``grad_hidden_chunk = dlogits @ weight`` and ``grad_weight += dlogits.T @ hidden_chunk`` with cuBLAS (fp32
   accumulation inside the GEMM; ``grad_weight`` itself is kept in the weight's dtype, so it costs no memory beyond
   the gradient that has to exist anyway).

The full ``(N, V)`` logits never exist: the extra memory is one ``(chunk_rows, V)`` buffer. Nothing here reads a
device value on the host, so there is no host-device synchronisation. With ``row_index`` (the op's
``num_label_tokens``) the chunks cover only those rows, gathered chunk by chunk: H200, N=16384, H=4096, V=151936,
one run (2026-11-29): 92.6 instead of 101.9 ms with 10% of labels ignored, 50.5 instead of 96.9 ms with 50%
(0.236 instead of 0.218 GiB extra; torch.compile 94.4 and 90.6 ms).

Measured on an H200 (bf16, forward + backward of the public op, 10% of labels ignored; "floor" = 6NHV FLOP at the
784 TFLOP/s of ANCHORS.md). At N=16384, H=4096, V=151936 (floor 78.0 ms), one run of bench/cross_entropy.py
(2026-11-29): 98.7 ms with 0.22 GiB extra memory, 90.0 ms given the label count, against torch.compile 92.6 ms
(4.64 GiB) and liger-kernel 104.0 ms (0.15 GiB). The pass cuts the tokens into 22 chunks of up to 768 rows.

- Where the time goes (torch.profiler, same machine, per fwd+bwd): 96.5 ms of kernels, of which the three cuBLAS
  GEMMs take 91.9 ms and the row kernel 4.5 ms (0.204 ms per chunk, 3.6 TB/s over its three passes). Per chunk:
  logits 1.29 ms, grad_hidden 1.30 ms, grad_weight 1.45 ms for the first chunk and 1.67 ms for the others (the GEMM
  re-reads and re-writes all of grad_weight). The first two run at about 740 TFLOP/s.
- The same GEMMs timed alone, with the GPU idle between calls, run 8-14% faster (logits and grad_hidden 1.17-1.19
  ms, grad_weight 1.28-1.30 ms, or 1.49 ms re-reading grad_weight). Under the sustained load of a whole pass the GPU
  sits at its 700 W power limit and they do not: the op's kernel sequence took 101.1 ms of kernel time back to
  back and 88.4 ms with 0.5 ms of idle before each kernel; 21 logits GEMMs back to back took 1.424 ms each, with
  idle gaps 1.245 ms (one probe, 2026-11-29).
- So the GEMMs alone bound the pass, and ``bench/cross_entropy.py`` times them (``gemm_bound``: the three GEMMs of
  the kept tokens back to back, no softmax work). One run (2026-11-30): 89.3 ms in the pass's 768-row chunks and
  80.1 ms in one chunk (4.5 GB of logits), against the op's 91.7 ms with the label count (100.7 without) and
  torch.compile's 96.0. A probe the same day: 86.2 ms chunked with grad_weight overwritten instead of accumulated
  (no re-read), 95.1 ms chunked with the logits transposed (``W @ x.T``). Within 0.25 GiB of extra memory a chunk
  holds at most 883 rows (768 as rounded here), so no pass built on these GEMMs reaches 84 ms or 1.14x torch.compile
  here; the op's own overhead over its GEMMs (the row kernel, the gathers) is 2.4 ms.
- Measured and not kept (changes under 1% of the total, or a loss elsewhere):
  - Triton GEMMs in place of cuBLAS.
  - A logits GEMM whose epilogue wrote per-block softmax statistics (740 TFLOP/s; the row kernel then read the
    logits once).
  - grad_weight GEMMs in Triton, one 768-row chunk, against cuBLAS ``addmm_`` at 1.49 ms (2026-11-29):
    - a persistent TMA kernel adding the old value in its epilogue takes 1.74 ms (only 128x128 tiles fit in shared
      memory);
    - one that accumulates with TMA reduce-adds takes 1.45 ms, but it rounds each chunk's product to bf16 before
      the add (error 2.34e-3 against 1.66e-3 for one chunk), on top of the 2.64e-3 the op's grad_weight already
      has at the anchor (torch's bf16 path: 1.79e-3; the bound is twice that).
  - ``torch._grouped_mm`` with the kept-row count on the device, which would let the pass skip ignored rows without
    the host's count:
    - logits: 1.215 ms against 1.191 ms for ``mm``, and 0.79 ms at half the rows;
    - grad_hidden: 1.415 ms against 1.194 ms, and still 1.38 ms at half the rows (K = V is long and M short, and
      it does not split K).
  - cuBLASLt in place of cuBLAS (``torch.backends.cuda.preferred_blas_library``), and grad_hidden and grad_weight
    of a chunk run concurrently on two streams (both only read dlogits), one run (2026-11-29, with the label count):
    93.7, 93.1 and 92.7 ms (both) against 91.7 ms (92.6 ms repeated after them); alone, the two libraries time each
    GEMM within 1%.
  - The row kernel with 1-8 programs per multiprocessor looping over rows, or with 2048- or 8192-wide vocab blocks:
    0.192 ms at best, as one program per row with 4096-wide blocks.
  - The row kernel on a second stream, hidden behind the GEMMs: each chunk's logits GEMM in two or three row
    parts, each part's row kernel running beside the next part's GEMM, and grad_hidden per part as its row kernel
    ends (one probe, 2026-11-30, with the label count): 98.5 and 101.1 ms against 94.7-95.4 ms.

At N=8192, H=2048, V=128256: 21.2 ms (floor 16.5) against torch.compile 22.1 and liger 28.5. At N=4096, H=4096,
V=151936 (floor 19.5 ms) the tokens go in one chunk (N <= H, see ``DEFAULT_CHUNK_BYTES``): 22.5 ms (1.15x the floor,
1.16 GiB extra, as torch.compile's) against torch.compile 22.1 and liger 54.5; six 256 MiB chunks took 25.3 ms.
At N=4096 across vocabularies (one run, 2026-11-30; 1.04 / 1.12 / 1.13 / 1.18x the floor): V=32000 4.29 ms, 128256
18.5, 151936 22.1, 262144 39.7 (2 GiB extra, as torch.compile's), against torch.compile 4.40 / 19.1 / 24.9 / 42.4
and liger 5.78 / 45.7 / 54.4 / 180.2 ms.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Bytes of the reused (chunk_rows, V) logits buffer, the only extra memory besides the gradients themselves. The
# grad_weight GEMM has K = chunk_rows and re-reads and re-writes all of grad_weight once per chunk, so bigger chunks are
# faster and cost memory (256 MiB = 768 rows at V=151936 in bf16, rounded down to CHUNK_ROW_MULTIPLE). 256 MiB keeps
# the extra memory within 0.25 GiB at N=16384, H=4096, V=151936. One H200 run there (bench/cross_entropy.py,
# 2026-11-29): 256 MiB 98.7 ms (0.22 GiB extra), 512 MiB 94.1 ms (0.44), 1 GiB 92.1 ms (0.87), 2 GiB 92.9 ms (1.59);
# an earlier run had 512 MiB slower (101.0 ms). At N=8192, H=2048, V=128256 (the 1B model's training loss, no label
# ignored): 20.8 ms with 256 MiB (0.25 GiB extra), 20.3 with 512 MiB, 20.2 with 1 GiB and 19.7 ms in one chunk
# (1.96 GiB extra) (2026-11-29).
DEFAULT_CHUNK_BYTES = 256 * 2**20
# For more tokens the default budget grows to what the hidden states and their gradient take (2 * N * H elements,
# which exist anyway), up to this cap. H200, H=4096, V=151936, fwd+bwd (one run, 2026-11-29): at N=65536, 768 rows
# (256 MiB) took 405 ms, 3072 rows (the cap's, 0.87 GiB extra) 371 ms and torch.compile 386 ms (18.5 GiB); at
# N=32768, 768 rows 199 ms, 1536 rows (0.44 GiB) 191 ms, torch.compile 189 ms (9.3 GiB). bench/cross_entropy.py with
# this default at N=65536: 375.8 ms (0.87 GiB) against torch.compile 390.5 ms (18.5 GiB).
MAX_CHUNK_BYTES = 1024 * 2**20
# With the default budget, when grad_weight is wanted and there are no more tokens than the hidden size (so all
# logits take no more memory than grad_weight, which has to exist anyway), the tokens go in one chunk: each further
# chunk re-reads and re-writes all of grad_weight (2.5 GB at H=4096, V=151936), which at N=4096 costs more time
# than the logits' memory is worth (at N=4096: 21.8 ms in one chunk, 25.3 ms in six of 256 MiB; floor 19.5 ms).
# Chunk row counts are multiples of CHUNK_ROW_MULTIPLE, so the GEMMs see well-shaped tiles, and of
# LARGE_CHUNK_ROW_MULTIPLE once the budget holds twice that many rows: cuBLAS picked slow kernels for 1664-row chunks
# (at N=65536: 402 ms against 377 ms for 2048 rows; at N=32768: 200 against 191 ms for 1536 rows, same run as above).
# Finer multiples fit more rows in the 256 MiB default but were no faster at N=16384, V=151936 (one run, 2026-11-29):
# 832-row chunks (multiple 64) 109.7 ms and 99.4 ms with the label count, 864 rows (multiple 32) 100.8 ms, against
# 100.5 and 92.5 ms for 768 rows; 832 rows with the label count also took 0.256 GiB extra, above the 0.25 GiB target.
CHUNK_ROW_MULTIPLE = 128
LARGE_CHUNK_ROW_MULTIPLE = 512
MAX_BLOCK_V = 4096

# A finite "minus infinity": keeps exp(m_old - m_new) free of (-inf) - (-inf) = nan.
_NEG_BIG: tl.constexpr = tl.constexpr(-1.0e30)
# Neighbouring logits that share one running max in the logsumexp pass (``_row_lse``); the vocab block is at least
# this wide.
_ROW_GROUP: tl.constexpr = tl.constexpr(16)


def default_chunk_bytes(n_tokens: int, hidden_size: int, elem_bytes: int) -> int:
    """The logits-buffer budget when the caller gives none: ``DEFAULT_CHUNK_BYTES``, or as much as the hidden states
    and their gradient take (``2 * n_tokens * hidden_size`` elements) up to ``MAX_CHUNK_BYTES``. Both are read at
    call time."""
    return max(DEFAULT_CHUNK_BYTES, min(MAX_CHUNK_BYTES, 2 * n_tokens * hidden_size * elem_bytes))


def chunk_rows(n_tokens: int, vocab: int, elem_bytes: int, *, budget_bytes: int, whole_up_to: int = 0) -> int:
    """Rows per chunk. All ``n_tokens`` if their logits fit in ``budget_bytes`` or if there are at most
    ``whole_up_to`` of them; else the fewest chunks that fit, balanced, each a multiple of ``CHUNK_ROW_MULTIPLE``
    rows (at least one), or of ``LARGE_CHUNK_ROW_MULTIPLE`` when the budget holds twice that many rows."""
    fit = budget_bytes // (vocab * elem_bytes)
    multiple = LARGE_CHUNK_ROW_MULTIPLE if fit >= 2 * LARGE_CHUNK_ROW_MULTIPLE else CHUNK_ROW_MULTIPLE
    max_rows = max(multiple, fit // multiple * multiple)
    if n_tokens <= max(max_rows, whole_up_to):
        return max(1, n_tokens)
    per_chunk = -(-n_tokens // -(-n_tokens // max_rows))  # ceil(n / number of chunks)
    return -(-per_chunk // multiple) * multiple


@triton.jit
def _softcap(x, softcap):
    """softcap * tanh(x / softcap), written with exp so that it is accurate near 0 and saturates cleanly."""
    y = x / softcap
    e = tl.exp(-2.0 * tl.abs(y))
    t = (1.0 - e) / (1.0 + e)
    return softcap * tl.where(y < 0, -t, t)


@triton.jit
def _row_lse(row_ptr, V, softcap, HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr, BLOCK_V: tl.constexpr):
    """One pass over a row of logits: (logsumexp, sum) of the (soft-capped) logits; sum is 0 without smoothing.

    Each block of BLOCK_V logits is viewed as (BLOCK_V / G, G), G = ``_ROW_GROUP``; every group of G neighbours
    (held by a few threads) keeps a running max and sum, rescaled once per block: about one exp per logit. (A
    running max per logit costs two, and the exp unit, not memory, then bounds the pass: 2.2 TB/s on an H200.)"""
    offs = tl.arange(0, BLOCK_V // _ROW_GROUP)[:, None] * _ROW_GROUP + tl.arange(0, _ROW_GROUP)[None, :]
    m_vec = tl.full([BLOCK_V // _ROW_GROUP], _NEG_BIG, tl.float32)
    s_vec = tl.zeros([BLOCK_V // _ROW_GROUP], tl.float32)
    sum_vec = tl.zeros([BLOCK_V // _ROW_GROUP], tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        mask = cols < V
        x = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            x = _softcap(x, softcap)
        if HAS_SMOOTHING:
            sum_vec += tl.sum(tl.where(mask, x, 0.0), axis=1)
        x = tl.where(mask, x, _NEG_BIG)
        m_new = tl.maximum(m_vec, tl.max(x, axis=1))
        s_vec = s_vec * tl.exp(m_vec - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
        m_vec = m_new
    m = tl.max(m_vec, axis=0)
    return m + tl.log(tl.sum(s_vec * tl.exp(m_vec - m), axis=0)), tl.sum(sum_vec, axis=0)


@triton.jit
def _ce_rows_kernel(
    logits_ptr,
    stride_row,
    labels_ptr,
    scale_ptr,
    scale_stride,
    loss_ptr,
    z_ptr,
    rows,
    V,
    ignore_index,
    label_smoothing,
    lse_square_scale,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Each program loops over rows pid, pid + programs, ... (one row each when there are ``rows`` programs).

    logits: (rows, V) in the input dtype, overwritten with scale * dloss/dlogits when COMPUTE_GRAD;
    labels: (rows,); scale: token weights, read at ``row * scale_stride`` (stride 0 for one shared scalar);
    loss, z: (rows,) fp32, the cross-entropy and the z-loss term of each token (0 where ignored).
    """
    for r in range(tl.program_id(0), rows, tl.num_programs(0)):
        row = tl.cast(r, tl.int64)
        row_ptr = logits_ptr + row * stride_row
        label = tl.load(labels_ptr + row).to(tl.int64)
        valid = (label != ignore_index) & (label >= 0) & (label < V)
        lse, total = _row_lse(row_ptr, V, softcap, HAS_SOFTCAP, HAS_SMOOTHING, BLOCK_V)

        safe_label = tl.where(valid, label, 0)
        x_label = tl.load(row_ptr + safe_label).to(tl.float32)
        if HAS_SOFTCAP:
            x_label = _softcap(x_label, softcap)
        if HAS_SMOOTHING:
            ce = lse - (1.0 - label_smoothing) * x_label - label_smoothing / V * total
        else:
            ce = lse - x_label
        tl.store(loss_ptr + row, tl.where(valid, ce, 0.0))
        tl.store(z_ptr + row, tl.where(valid, lse_square_scale * lse * lse, 0.0))

        if COMPUTE_GRAD:
            scale = tl.load(scale_ptr + row * scale_stride).to(tl.float32)
            scale = tl.where(valid, scale, 0.0)
            p_coef = 1.0 + 2.0 * lse_square_scale * lse
            offs = tl.arange(0, BLOCK_V)
            n_blocks = tl.cdiv(V, BLOCK_V)  # last block first: the end of the row may still be in L2
            for i in range(0, n_blocks):
                cols = (n_blocks - 1 - i) * BLOCK_V + offs
                mask = cols < V
                x = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
                if HAS_SOFTCAP:
                    x = _softcap(x, softcap)
                grad = tl.exp(x - lse) * p_coef
                if HAS_SMOOTHING:
                    grad = grad - label_smoothing / V - (1.0 - label_smoothing) * (cols == label).to(tl.float32)
                else:
                    grad = grad - (cols == label).to(tl.float32)
                if HAS_SOFTCAP:
                    t = x / softcap
                    grad = grad * (1.0 - t * t)
                tl.store(row_ptr + cols, (grad * scale).to(logits_ptr.dtype.element_ty), mask=mask)


def ce_rows(
    logits: torch.Tensor,
    labels: torch.Tensor,
    token_scale: torch.Tensor,
    loss: torch.Tensor,
    z: torch.Tensor,
    *,
    ignore_index: int,
    label_smoothing: float,
    lse_square_scale: float,
    softcap: float | None,
    compute_grad: bool,
    block_v: int = MAX_BLOCK_V,
    programs: int = 0,
) -> None:
    """Launch ``_ce_rows_kernel`` on one chunk.

    logits: (rows, V), rows contiguous (overwritten with dlogits when ``compute_grad``); labels: (rows,);
    token_scale: 0-dim or (rows,) fp32; loss, z: (rows,) fp32 outputs;
    programs: 0 for one program per row, else that many programs looping over the rows. On an H200 the kernel alone
    moved 2466 GB/s with one program per row and 2721 GB/s with 528 programs (4 per SM), about 0.6 ms of the 98.7 ms
    pass at N=16384, V=151936; one program per row stays the default. The gradient pass walks each row from its
    last block back, as the end of the row, read last by the logsumexp pass, may still be in L2: 0.192 instead of
    0.230 ms for one 768-row chunk at V=151936 (3.6 instead of 3.0 TB/s, counting three passes over the logits).
    """
    rows, vocab = logits.shape
    assert logits.stride(1) == 1 and labels.is_contiguous() and loss.is_contiguous() and z.is_contiguous()
    assert programs >= 0 and block_v >= _ROW_GROUP
    if rows == 0:
        return
    block = max(_ROW_GROUP, min(block_v, triton.next_power_of_2(vocab)))
    _ce_rows_kernel[(min(programs, rows) if programs else rows,)](
        logits,
        logits.stride(0),
        labels,
        token_scale,
        token_scale.stride(0) if token_scale.dim() else 0,
        loss,
        z,
        rows,
        vocab,
        ignore_index,
        float(label_smoothing),
        float(lse_square_scale),
        float(softcap or 1.0),
        HAS_SOFTCAP=softcap is not None,
        HAS_SMOOTHING=label_smoothing != 0.0,
        COMPUTE_GRAD=compute_grad,
        BLOCK_V=block,
        num_warps=8 if block >= 2048 else 4,
    )


@triton.jit
def _scale_unless_one_kernel(x_ptr, scale_ptr, n, BLOCK: tl.constexpr):
    """x[block] *= scale, unless scale == 1: then nothing is read or written."""
    scale = tl.load(scale_ptr).to(tl.float32)
    if scale != 1.0:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
        tl.store(x_ptr + offs, (x * scale).to(x_ptr.dtype.element_ty), mask=mask)


def scale_unless_one_(t: torch.Tensor, scale: torch.Tensor) -> None:
    """``t *= scale`` in place (t contiguous, scale a 1-element tensor on t's device) without a host sync; when scale
    is 1, as for the loss of a training step, it costs one launch instead of a pass over t."""
    assert t.is_contiguous() and scale.numel() == 1
    if t.numel():
        block = 4096
        _scale_unless_one_kernel[(triton.cdiv(t.numel(), block),)](t, scale, t.numel(), BLOCK=block, num_warps=8)


class _Chunk:
    """Rows ``start:end`` of the rows a pass computes: the tokens themselves, or those of ``row_index[start:end]``,
    gathered. ``hidden (n, H)``, ``labels (n,)`` and ``token_scale`` (0-dim or (n,)) are the chunk's inputs."""

    def __init__(self, hidden, labels, token_scale, start: int, end: int, row_index: torch.Tensor | None):
        self.rows = slice(start, end) if row_index is None else row_index[start:end]
        if row_index is None:
            self.hidden, self.labels = hidden[start:end], labels[start:end]
            self.token_scale = token_scale[start:end] if token_scale.dim() else token_scale
        else:
            self.hidden, self.labels = hidden.index_select(0, self.rows), labels.index_select(0, self.rows)
            self.token_scale = token_scale.index_select(0, self.rows) if token_scale.dim() else token_scale

    def destination(self, full: torch.Tensor) -> torch.Tensor:
        """Where to write the chunk's rows of ``full (N, ...)``: a view of it, or scratch for ``commit``."""
        if isinstance(self.rows, slice):
            return full[self.rows]
        return full.new_empty((self.hidden.shape[0], *full.shape[1:]))

    def commit(self, full: torch.Tensor, part: torch.Tensor) -> None:
        """Copy ``part`` (from ``destination``) to the chunk's rows of ``full``; nothing for a view."""
        if not isinstance(self.rows, slice):
            full.index_copy_(0, self.rows, part)


def linear_cross_entropy_pass(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    token_scale: torch.Tensor,
    *,
    ignore_index: int,
    label_smoothing: float,
    lse_square_scale: float,
    softcap: float | None,
    grad_hidden: bool,
    grad_weight: bool,
    grad_bias: bool,
    chunk_bytes: int | None = None,
    row_programs: int = 0,
    block_v: int = MAX_BLOCK_V,
    row_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Per-token cross-entropy of ``hidden @ weight.T + bias`` and, if asked, the gradients of
    ``sum_n token_scale[n] * (ce[n] + z[n])``.

    hidden: (N, H); weight: (V, H) same dtype; bias: (V,) or None; labels: (N,) int; token_scale: 0-dim or (N,) fp32.
    Labels equal to ``ignore_index`` or outside [0, V) count as ignored (loss 0, no gradient).
    chunk_bytes: budget of the logits buffer (default ``default_chunk_bytes(N, H, ...)``, and all tokens in one chunk
    when there are no more than H of them and grad_weight is wanted);
    row_programs, block_v: the row kernel's grid and vocab block (see ``ce_rows``).
    row_index: (K,) int64 rows to compute (the others get loss 0 and no gradient, as if their label were ignored),
    e.g. the tokens whose label is not ignored; each chunk gathers its rows, and the chunks split K rows, not N.
    Returns ce (N,) fp32, z (N,) fp32 (``lse_square_scale * lse**2``), grad_hidden (N, H), grad_weight (V, H),
    grad_bias (V,), each grad in its input's dtype or None when not asked for.
    """
    n_tokens, _ = hidden.shape
    vocab = weight.shape[0]
    n_rows = n_tokens if row_index is None else row_index.numel()
    compute_grad = grad_hidden or grad_weight or grad_bias
    fill = torch.empty if row_index is None else torch.zeros  # rows left out keep a zero loss and gradient
    ce = fill(n_tokens, dtype=torch.float32, device=hidden.device)
    z = fill(n_tokens, dtype=torch.float32, device=hidden.device)
    g_hidden = fill(hidden.shape, dtype=hidden.dtype, device=hidden.device) if grad_hidden else None
    g_weight = (weight.new_empty(weight.shape) if n_rows else weight.new_zeros(weight.shape)) if grad_weight else None
    g_bias = torch.zeros(vocab, dtype=torch.float32, device=hidden.device) if grad_bias else None
    whole_up_to = hidden.shape[1] if grad_weight and chunk_bytes is None else 0
    if chunk_bytes is None:
        chunk_bytes = default_chunk_bytes(n_rows, hidden.shape[1], hidden.element_size())
    rows = chunk_rows(n_rows, vocab, hidden.element_size(), budget_bytes=chunk_bytes, whole_up_to=whole_up_to)
    buffer = torch.empty(rows, vocab, dtype=hidden.dtype, device=hidden.device)
    weight_t = weight.t()
    for start in range(0, n_rows, rows):
        end = min(start + rows, n_rows)
        chunk = _Chunk(hidden, labels, token_scale, start, end, row_index)
        logits = buffer[: end - start]
        if bias is None:
            torch.mm(chunk.hidden, weight_t, out=logits)
        else:
            torch.addmm(bias, chunk.hidden, weight_t, out=logits)
        chunk_ce, chunk_z = chunk.destination(ce), chunk.destination(z)
        ce_rows(
            logits,
            chunk.labels,
            chunk.token_scale,
            chunk_ce,
            chunk_z,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            lse_square_scale=lse_square_scale,
            softcap=softcap,
            compute_grad=compute_grad,
            block_v=block_v,
            programs=row_programs,
        )
        chunk.commit(ce, chunk_ce)
        chunk.commit(z, chunk_z)
        if g_hidden is not None:
            chunk_grad = chunk.destination(g_hidden)
            torch.mm(logits, weight, out=chunk_grad)
            chunk.commit(g_hidden, chunk_grad)
        if g_weight is not None:
            if start == 0:
                torch.mm(logits.t(), chunk.hidden, out=g_weight)
            else:
                g_weight.addmm_(logits.t(), chunk.hidden)
        if g_bias is not None:
            g_bias += logits.sum(0, dtype=torch.float32)
    if g_bias is not None and bias is not None:
        g_bias = g_bias.to(bias.dtype)
    return ce, z, g_hidden, g_weight, g_bias
