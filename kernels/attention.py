"""Host launchers of the packed varlen attention kernels (``attention_fwd.py``, ``attention_bwd.py``).

``varlen_attention_fwd`` returns the output and the fp32 log-sum-exp; ``varlen_attention_bwd`` returns dq, dk, dv.
Neither synchronizes with the device: the grids come from ``max_seqlen_*`` and the number of documents, and
programs past a document's end exit at once. Every output element is written by exactly one program (no atomics),
so the autotuner can re-run a kernel freely. Configs are tuned per head dim, dtype, window flags and a power-of-two
bucket of the longest document, among a few candidates per head-dim class. Under ``TRITON_INTERPRET=1`` each
kernel runs one small config.

Supported: fp16/bf16 (tensor-core dots, fp32 accumulation) and fp32 (exact ``ieee`` dots: correct but slow on a
GPU); head dims 16, 32, 64, 128, 256; at most 65535 documents and 65535 * 32 tokens per document (grid
limits; every config's grid block is at least 32). The caller (``veofast.ops.attention``) validates the inputs.
"""

from __future__ import annotations

import math
import os

import torch
import triton

from .attention_bwd import _attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel, _attn_bwd_preprocess_kernel
from .attention_fwd import _attn_fwd_kernel

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_KEY = ["HEAD_DIM", "HAS_LEFT", "HAS_RIGHT", "seqlen_bucket"]

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per head-dim class (16 and 32 use the 64 list), picked from sm_90
# compiles of these kernels: no register spills and shared memory within the H200's 227 KB per block (head dim
# 256 needs small tiles). fp32 inputs (CUDA-core dots) keep only tiles of at most 64 x 32.
_FWD_SHAPES = {
    64: [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 8, 3), (64, 32, 4, 3), (32, 32, 4, 2)],
    128: [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 8, 3), (64, 32, 4, 3), (32, 32, 4, 2)],
    256: [(128, 32, 8, 3), (64, 32, 4, 3), (64, 32, 4, 2), (32, 32, 4, 2)],
}
_DKDV_SHAPES = {  # BLOCK_M: queries per step, BLOCK_N: keys per program
    64: [(64, 128, 8, 2), (32, 128, 8, 3), (64, 64, 4, 3), (64, 64, 8, 3), (32, 64, 4, 3), (32, 32, 4, 2)],
    128: [(32, 64, 8, 3), (32, 128, 8, 3), (64, 64, 8, 2), (16, 64, 4, 3), (32, 32, 4, 2)],
    256: [(32, 32, 8, 2), (64, 32, 8, 2), (16, 32, 4, 2)],
}
_DQ_SHAPES = {
    64: [(128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 4, 3), (128, 64, 8, 3), (64, 32, 4, 3), (32, 32, 4, 2)],
    128: [(128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3), (128, 64, 8, 3), (32, 32, 4, 2)],
    256: [(64, 32, 4, 3), (64, 32, 8, 2), (128, 32, 8, 2), (32, 32, 4, 2)],
}


def _head_dim_class(head_dim: int) -> int:
    return max(head_dim, 64)


def _autotuned(kernel, shapes: dict[int, list[tuple[int, int, int, int]]], interpret_shape: tuple[int, int]):
    """``kernel`` autotuned over the shapes of its head-dim class, or with one small config under the interpreter."""
    if _INTERPRET:
        bm, bn = interpret_shape
        return triton.autotune([triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=4, num_stages=1)], _KEY)(kernel)
    union = sorted({shape for group in shapes.values() for shape in group})
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in union]

    def prune(configs, named_args, **kwargs):
        allowed = set(shapes[_head_dim_class(kwargs["HEAD_DIM"])])
        fp32 = named_args["Q"].element_size() == 4
        kept = [
            c
            for c in configs
            if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in allowed
            and not (fp32 and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] > 64 * 32)
        ]
        return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]

    return triton.autotune(configs, _KEY, prune_configs_by={"early_config_prune": prune})(kernel)


_fwd = _autotuned(_attn_fwd_kernel, _FWD_SHAPES, (32, 16))
_dkdv = _autotuned(_attn_bwd_dkdv_kernel, _DKDV_SHAPES, (16, 32))
_dq = _autotuned(_attn_bwd_dq_kernel, _DQ_SHAPES, (16, 32))


def _flags(window_left: int, window_right: int, dtype: torch.dtype, max_seqlen: int) -> dict:
    return {
        "HAS_LEFT": window_left >= 0,
        "HAS_RIGHT": window_right >= 0,
        "DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32",
        "seqlen_bucket": min(triton.next_power_of_2(max(max_seqlen, 1)), 1 << 16),
    }


def varlen_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    softmax_scale: float,
    window_left: int,
    window_right: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward pass. q: (total_q, Hq, D), k/v: (total_k, Hk, D) with unit last-dim stride; window sides -1 =
    unlimited (causal = ``window_right=0``). Returns out (total_q, Hq, D) in q's dtype and lse (Hq, total_q) fp32."""
    total_q, num_heads, head_dim = q.shape
    num_docs = cu_seqlens_q.numel() - 1
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((num_heads, total_q), device=q.device, dtype=torch.float32)
    if total_q == 0 or num_docs == 0 or max_seqlen_q == 0:
        return out, lse.fill_(float("inf"))
    grid = lambda meta: (num_heads, num_docs, triton.cdiv(max_seqlen_q, meta["BLOCK_M"]))
    _fwd[grid](
        q,
        k,
        v,
        out,
        lse,
        cu_seqlens_q,
        cu_seqlens_k,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        out.stride(0),
        out.stride(1),
        total_q,
        softmax_scale * math.log2(math.e),
        max(window_left, 0),
        max(window_right, 0),
        num_heads // k.shape[1],
        HEAD_DIM=head_dim,
        **_flags(window_left, window_right, q.dtype, max_seqlen_q),
    )
    return out, lse


def varlen_attention_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    softmax_scale: float,
    window_left: int,
    window_right: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward pass from the forward's ``out`` and ``lse``. dout: (total_q, Hq, D) with unit last-dim stride.
    Returns dq (total_q, Hq, D), dk, dv (total_k, Hk, D), in the inputs' dtype."""
    total_q, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    num_docs = cu_seqlens_q.numel() - 1
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    if num_docs == 0 or total_q == 0 or k.shape[0] == 0 or max_seqlen_q == 0 or max_seqlen_k == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = torch.empty_like(lse)
    block_t = 64
    _attn_bwd_preprocess_kernel[(triton.cdiv(total_q, block_t), num_heads)](
        out,
        dout,
        delta,
        out.stride(0),
        out.stride(1),
        dout.stride(0),
        dout.stride(1),
        total_q,
        HEAD_DIM=head_dim,
        BLOCK_T=block_t,
    )
    common = dict(
        total_q=total_q,
        sm_scale=softmax_scale,
        qk_scale=softmax_scale * math.log2(math.e),
        window_left=max(window_left, 0),
        window_right=max(window_right, 0),
        group_size=num_heads // num_kv_heads,
        HEAD_DIM=head_dim,
        **_flags(window_left, window_right, q.dtype, max(max_seqlen_q, max_seqlen_k)),
    )
    strides = (
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        dout.stride(0),
        dout.stride(1),
    )
    _dkdv[lambda meta: (num_kv_heads, num_docs, triton.cdiv(max_seqlen_k, meta["BLOCK_N"]))](
        q,
        k,
        v,
        dout,
        lse,
        delta,
        dk,
        dv,
        cu_seqlens_q,
        cu_seqlens_k,
        *strides,
        dk.stride(0),
        dk.stride(1),
        dv.stride(0),
        dv.stride(1),
        **common,
    )
    _dq[lambda meta: (num_heads, num_docs, triton.cdiv(max_seqlen_q, meta["BLOCK_M"]))](
        q,
        k,
        v,
        dout,
        lse,
        delta,
        dq,
        cu_seqlens_q,
        cu_seqlens_k,
        *strides,
        dq.stride(0),
        dq.stride(1),
        **common,
    )
    return dq, dk, dv
