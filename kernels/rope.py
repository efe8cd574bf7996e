"""Triton kernel of rotary position embedding (HF ``rotate_half`` convention) for q and k in one launch.

Each program takes ``tokens`` consecutive tokens: it loads their positions, computes ``cos``/``sin`` of
``position * inv_freq`` in fp32 once (no cos/sin tensors exist in memory), then walks the q heads and k heads of
those tokens, ``heads`` heads per step, rotating the first half of ``head_dim`` against the second. A step loads
and stores ``(heads, tokens, head_dim / 2)`` tiles, each row of a tile being one contiguous half of a head;
``stages > 1`` lets Triton prefetch the next heads while the current ones are rotated. The transcendental math is
paid once per program for its tokens (by as few threads per value as the layout allows), not once per head.

The grid is (token blocks, ``groups``): the steps of a token block (the q steps, then the k steps) are dealt
round-robin to ``groups`` programs, so ``groups=1`` walks all heads in one program and ``groups`` >= the number of
steps gives each program one step (more programs, each with all its loads in flight at once; cos/sin are then
recomputed per program). The backward is the same kernel rotating by the negative angle.

Tunables per head-dim class live in ``CONFIGS``; ``rotary`` takes ``config=`` to override them
(``bench/small_ops.py --sections sweep`` uses it; ``candidates()`` lists configs worth timing).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Per head-dim class, keyed by BLOCK_HALF = next_power_of_2(head_dim / 2) (the smallest key >= it applies; wider
# heads use the last entry):
# tokens = tokens per program, heads = heads per step (a power of 2), warps = warps per program, stages = pipelining
# depth of the loop over heads, groups = programs per token block sharing its head steps (capped at the number of
# steps; 1: one program walks all heads).
CONFIGS: dict[int, dict[str, int]] = {
    # H200 sweep (bench/small_ops.py, 2026-11-29): one token per program, all its heads in one or two steps
    32: {"tokens": 1, "heads": 32, "warps": 2, "stages": 1, "groups": 1},  # 3.46 TB/s geo-mean (d64), 1.11x before
    64: {"tokens": 1, "heads": 16, "warps": 2, "stages": 1, "groups": 1},  # 3.75 TB/s geo-mean (d128), 1.09x before
    128: {"tokens": 2, "heads": 8, "warps": 4, "stages": 2, "groups": 1},
}


@triton.jit
def _rotate_heads(
    x_ptr,
    out_ptr,
    tokens,
    token_mask,
    first_step,
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
    GROUPS: tl.constexpr,
):
    """Rotate the heads of ``tokens`` (BLOCK_T,) int64 in steps of BLOCK_H heads: steps ``first_step``,
    ``first_step + GROUPS``, ... of [0, n_heads); cos, sin: (1, BLOCK_T, BLOCK_HALF) fp32.
    out[..., :half] = x1 * cos - x2 * sin; out[..., half:] = x2 * cos + x1 * sin.
    Head offsets are int64: in a head-major layout (head stride ``tokens * head_dim``, e.g. a transposed
    ``(heads, tokens, head_dim)`` tensor) ``head * stride`` passes 2**31 once ``(heads - 1) * tokens * head_dim``
    does; it costs BLOCK_H 64-bit products per step.

    Tiles are (heads, tokens, dims): Triton spreads a warp's threads over dims, then tokens, then heads, so few
    threads share a (token, dim) and cos/sin (computed in the same layout) are duplicated across few threads.
    """
    dims = tl.arange(0, BLOCK_HALF)[None, None, :]
    x_rows = x_ptr + tokens[None, :, None] * stride_xt + dims
    out_rows = out_ptr + tokens[None, :, None] * stride_ot + dims
    row_mask = token_mask[None, :, None] & (dims < half)
    out_ty = out_ptr.dtype.element_ty
    for first in tl.range(first_step * BLOCK_H, n_heads, GROUPS * BLOCK_H, num_stages=STAGES):
        heads = (first + tl.arange(0, BLOCK_H))[:, None, None]
        mask = row_mask & (heads < n_heads)
        heads = heads.to(tl.int64)
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
    GROUPS: tl.constexpr,
):
    # int64 from the start: 2**31 tokens or more (one narrow head) must not wrap either
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    token_mask = tokens < n_tokens
    dims = tl.arange(0, BLOCK_HALF)
    position = tl.load(pos_ptr + tokens, mask=token_mask, other=0).to(tl.float32)
    inv_freq = tl.load(inv_freq_ptr + dims, mask=dims < half, other=0.0)
    # Same fp32 product as HF's ``inv_freq.float() @ position_ids.float()``; once per (token, frequency).
    freqs = (position[:, None] * inv_freq[None, :])[None, :, :]
    cos = tl.cos(freqs) * cos_scale
    sin = tl.sin(freqs) * sin_scale
    # Steps 0 .. n_q_steps - 1 rotate q heads, the next ones k heads; program ``group`` takes the steps that are
    # ``group`` modulo GROUPS (all of them when GROUPS is 1).
    if GROUPS == 1:
        q_step = 0
        k_step = 0
    else:
        group = tl.program_id(1)
        q_step = group
        k_step = (group + GROUPS - tl.cdiv(n_q_heads, BLOCK_H) % GROUPS) % GROUPS
    _rotate_heads(
        q_ptr,
        q_out_ptr,
        tokens,
        token_mask,
        q_step,
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
        GROUPS,
    )
    _rotate_heads(
        k_ptr,
        k_out_ptr,
        tokens,
        token_mask,
        k_step,
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
        GROUPS,
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
    """Configs worth timing at ``head_dim`` (the sweep of bench/small_ops.py), the current one first; tiles of
    ``tokens x heads x head_dim / 2`` elements with 16 or 32 elements per thread (2 or 4 16-byte vectors per load).

    - a few steps of 2k elements with 2-8 heads and 4 warps (the best family of the sweeps before these configs);
    - many programs: 1, 2 or 4 tokens per program (T / tokens programs, so an SM holds many programs and many loads
      in flight) with 8-64 heads per step (32 and more: all q heads of a token in one step), 1-8 warps (fewer
      threads per program: each thread rotates several heads with the same cos/sin values); for 4 tokens also
      with prefetching of the next heads;
    - one step per program (``groups`` capped at the number of steps): 8 heads of 1k-4k elements.
    """
    block_half = _block_half(head_dim)
    configs = [config_for(head_dim)]
    base = {"stages": 1, "groups": 1}
    for tokens in (8, 16, 32):
        heads = 2048 // (tokens * block_half)
        if 2 <= heads <= 8:
            configs.append({"tokens": tokens, "heads": heads, "warps": 4, **base})
    for tokens in (1, 2, 4):
        for heads in (8, 16, 32, 64):
            elements = tokens * heads * block_half
            if elements in (1024, 2048) or (tokens == 1 and heads == 64):
                for warps in [w for w in (elements // 1024, elements // 512) if 1 <= w <= 8]:
                    configs.append({"tokens": tokens, "heads": heads, "warps": warps, **base})
                    if tokens == 4 and warps == elements // 1024:
                        configs.append({"tokens": tokens, "heads": heads, "warps": warps, "stages": 2, "groups": 1})
    for elements in (1024, 2048, 4096):
        tokens = max(1, elements // (8 * block_half))
        configs.append({"tokens": tokens, "heads": 8, "warps": elements // 1024, "stages": 1, "groups": 64})
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
    inplace: bool = False,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the rotation; returns (q_out, k_out): fresh contiguous tensors, or q and k themselves, rotated in
    place, with ``inplace`` (each program reads a token's heads before it writes them, so this is safe).

    q: (T, Hq, D), k: (T, Hk, D), each with unit stride in D (any token/head strides); position_ids: (T,)
    contiguous int32/int64; inv_freq: (D/2,) contiguous fp32. ``inverse`` rotates by the negative angle
    (the backward). config: overrides of ``CONFIGS``.
    """
    n_tokens, n_q_heads, head_dim = q.shape
    n_k_heads = k.shape[1]
    if inplace:
        q_out, k_out = q, k
    else:
        q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if n_tokens == 0:
        return q_out, k_out
    cfg = config_for(head_dim, config)
    n_steps = triton.cdiv(n_q_heads, cfg["heads"]) + triton.cdiv(n_k_heads, cfg["heads"])
    groups = max(1, min(cfg.get("groups", 1), n_steps))
    _rotary_kernel[(triton.cdiv(n_tokens, cfg["tokens"]), groups)](
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
        GROUPS=groups,
        num_warps=cfg["warps"],
    )
    return q_out, k_out
