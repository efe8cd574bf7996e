"""Triton kernel of rotary position embedding (HF ``rotate_half`` convention) for q and k in one launch.

Each program takes ``tokens`` consecutive tokens: it loads their positions, computes ``cos``/``sin`` of
``position * inv_freq`` in fp32 once (no cos/sin tensors exist in memory), then walks all q heads and all k heads
of those tokens, ``heads`` heads per step, rotating the first half of ``head_dim`` against the second. A step
loads and stores ``(heads, tokens, head_dim / 2)`` tiles, each row of a tile being one contiguous half of a head;
``stages > 1`` lets Triton prefetch the next heads while the current ones are rotated. The transcendental math is
paid once per program for its tokens (by as few threads per value as the layout allows), not once per head. The
backward is the same kernel rotating by the negative angle.

Tunables per head-dim class live in ``CONFIGS``; ``rotary`` takes ``config=`` to override them
(``bench/small_ops.py --sections sweep`` uses it; ``candidates()`` lists configs worth timing).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Per head-dim class, keyed by BLOCK_HALF = next_power_of_2(head_dim / 2) (the smallest key >= it applies; wider
# heads use the last entry):
# tokens = tokens per program, heads = heads per step, warps = warps per program, stages = pipelining depth of the
# loop over heads.
CONFIGS: dict[int, dict[str, int]] = {
    32: {"tokens": 32, "heads": 4, "warps": 8, "stages": 1},  # H200 sweep: 3.10 TB/s geo-mean (d64)
    64: {"tokens": 32, "heads": 2, "warps": 8, "stages": 1},  # H200 sweep: 3.41 TB/s geo-mean (d128)
    128: {"tokens": 2, "heads": 8, "warps": 4, "stages": 2},
}


@triton.jit
def _rotate_heads(
    x_ptr,
    out_ptr,
    tokens,
    token_mask,
    n_heads,
    half,
    stride_xt,
    stride_xh,
    stride_ot,
    stride_oh,
    cos,
    sin,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    STAGES: tl.constexpr,
):
    """Rotate heads [0, n_heads) of ``tokens`` (BLOCK_T,) int64, BLOCK_H heads per step; cos, sin: (1, BLOCK_T,
    BLOCK_HALF) fp32. out[..., :half] = x1 * cos - x2 * sin; out[..., half:] = x2 * cos + x1 * sin.

    Tiles are (heads, tokens, dims): Triton spreads a warp's threads over dims, then tokens, then heads, so few
    threads share a (token, dim) and cos/sin (computed in the same layout) are duplicated across few threads.
    """
    dims = tl.arange(0, BLOCK_HALF)[None, None, :]
    x_rows = x_ptr + tokens[None, :, None] * stride_xt + dims
    out_rows = out_ptr + tokens[None, :, None] * stride_ot + dims
    row_mask = token_mask[None, :, None] & (dims < half)
    out_ty = out_ptr.dtype.element_ty
    for first in tl.range(0, n_heads, BLOCK_H, num_stages=STAGES):
        heads = (first + tl.arange(0, BLOCK_H))[:, None, None]
        mask = row_mask & (heads < n_heads)
        x_first = x_rows + heads * stride_xh
        x1 = tl.load(x_first, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_first + half, mask=mask, other=0.0).to(tl.float32)
        out_first = out_rows + heads * stride_oh
        tl.store(out_first, (x1 * cos - x2 * sin).to(out_ty), mask=mask)
        tl.store(out_first + half, (x2 * cos + x1 * sin).to(out_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr,
    k_ptr,
    q_out_ptr,
    k_out_ptr,
    pos_ptr,
    inv_freq_ptr,
    n_tokens,
    n_q_heads,
    n_k_heads,
    half,
    cos_scale,
    sin_scale,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_qot,
    stride_qoh,
    stride_kot,
    stride_koh,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    STAGES: tl.constexpr,
):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    token_mask = tokens < n_tokens
    dims = tl.arange(0, BLOCK_HALF)
    position = tl.load(pos_ptr + tokens, mask=token_mask, other=0).to(tl.float32)
    inv_freq = tl.load(inv_freq_ptr + dims, mask=dims < half, other=0.0)
    # Same fp32 product as HF's ``inv_freq.float() @ position_ids.float()``; once per (token, frequency).
    freqs = (position[:, None] * inv_freq[None, :])[None, :, :]
    cos = tl.cos(freqs) * cos_scale
    sin = tl.sin(freqs) * sin_scale
    tokens = tokens.to(tl.int64)
    _rotate_heads(
        q_ptr,
        q_out_ptr,
        tokens,
        token_mask,
        n_q_heads,
        half,
        stride_qt,
        stride_qh,
        stride_qot,
        stride_qoh,
        cos,
        sin,
        BLOCK_H,
        BLOCK_HALF,
        STAGES,
    )
    _rotate_heads(
        k_ptr,
        k_out_ptr,
        tokens,
        token_mask,
        n_k_heads,
        half,
        stride_kt,
        stride_kh,
        stride_kot,
        stride_koh,
        cos,
        sin,
        BLOCK_H,
        BLOCK_HALF,
        STAGES,
    )


def _block_half(head_dim: int) -> int:
    return triton.next_power_of_2(head_dim // 2)


def table_key(head_dim: int) -> int:
    """The key of ``CONFIGS`` that applies to ``head_dim``."""
    return next((key for key in sorted(CONFIGS) if key >= _block_half(head_dim)), max(CONFIGS))


def config_for(head_dim: int, override: dict | None = None) -> dict[str, int]:
    """The tunables for ``head_dim``, with ``override`` on top."""
    return {**CONFIGS[table_key(head_dim)], **(override or {})}


def candidates(head_dim: int) -> list[dict[str, int]]:
    """Configs worth timing at ``head_dim`` (the sweep of bench/small_ops.py): the current one, then steps of 2k and
    4k elements (heads x tokens x head_dim / 2) at 16 elements per thread (two 16-byte vectors per load), with and
    without prefetching the next heads. More tokens per program: fewer threads compute the same cos/sin value (a
    warp spreads over dims, then tokens, then heads), but there are fewer programs."""
    block_half = _block_half(head_dim)
    configs = [config_for(head_dim)]
    for elements in (2048, 4096):
        for tokens in (2, 4, 8, 16, 32):
            heads = elements // (tokens * block_half)
            if 2 <= heads <= 8:
                configs += [{"tokens": tokens, "heads": heads, "warps": elements // 512, "stages": s} for s in (1, 2)]
    unique = []
    for config in configs:
        if config not in unique:
            unique.append(config)
    return unique


def rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    position_ids: torch.Tensor,
    inv_freq: torch.Tensor,
    scaling: float,
    inverse: bool,
    *,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the rotation; returns fresh contiguous (q_out, k_out).

    q: (T, Hq, D), k: (T, Hk, D), each with unit stride in D (any token/head strides); position_ids: (T,)
    contiguous int32/int64; inv_freq: (D/2,) contiguous fp32. ``inverse`` rotates by the negative angle
    (the backward). config: overrides of ``CONFIGS``.
    """
    n_tokens, n_q_heads, head_dim = q.shape
    n_k_heads = k.shape[1]
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if n_tokens == 0:
        return q_out, k_out
    cfg = config_for(head_dim, config)
    _rotary_kernel[(triton.cdiv(n_tokens, cfg["tokens"]),)](
        q,
        k,
        q_out,
        k_out,
        position_ids,
        inv_freq,
        n_tokens,
        n_q_heads,
        n_k_heads,
        head_dim // 2,
        scaling,
        -scaling if inverse else scaling,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        q_out.stride(0),
        q_out.stride(1),
        k_out.stride(0),
        k_out.stride(1),
        BLOCK_T=cfg["tokens"],
        BLOCK_H=cfg["heads"],
        BLOCK_HALF=_block_half(head_dim),
        STAGES=cfg["stages"],
        num_warps=cfg["warps"],
    )
    return q_out, k_out
