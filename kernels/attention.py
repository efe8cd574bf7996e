"""Host launchers of the packed varlen attention kernels (``attention_fwd.py``, ``attention_bwd.py``).

``varlen_attention_fwd`` returns the output and the fp32 log-sum-exp; ``varlen_attention_bwd`` returns dq, dk, dv
(``attention_bwd_dq`` then ``attention_bwd_dkdv``, also callable alone for benchmarks). Nothing synchronizes with
the device: a small kernel writes each launch's tile table from ``cu_seqlens`` (sized from the token and document
counts and ``max_seqlen``; kept for the next layers, which pass the same ``cu_seqlens``), and every output element
is written by exactly one program (no atomics).

Tile sizes, warps, stages and the load path are fixed per (kernel, head-dim class, 16-bit or fp32) in ``CONFIGS``
(no autotuning, so nothing is compiled twice); each launcher takes ``config=`` to override it (the GPU sweep in
``bench/attention.py`` does). TMA loads need sm_90+ and tensors whose (tokens, heads * head_dim) view has 16-byte
aligned data and token stride; otherwise the pointer path runs (logged once). Under ``TRITON_INTERPRET=1`` each
kernel runs one small config.

Programmatic dependent launch (each kernel waits on ``griddepcontrol.wait`` and releases the next one with
``launch_dependents``, at its start or after its main loop) was measured on an H200 (triton 3.6, fwd+bwd of the op,
2026-11-29) and is not used: at the anchor mix -0.7% to +0.5% depending on the run, but 2-5% slower at documents of
8192 tokens and up to 2.9% slower at 2048.

Supported: fp16/bf16 (tensor-core dots, fp32 accumulation) and fp32 (exact ``ieee`` dots: correct but slow on a
GPU); head dims 16, 32, 64, 128, 256. The caller (``veofast.ops.attention``) validates the inputs.
"""

from __future__ import annotations

import collections
import functools
import logging
import math
import os
import weakref
from dataclasses import dataclass

import torch
import triton
from triton.tools.tensor_descriptor import TensorDescriptor

from .attention_bwd import _attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel
from .attention_fwd import TILE_FIELDS, _attn_fwd_kernel, _schedule_kernel

logger = logging.getLogger("veofast.kernels")
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class Config:
    """Launch choices of one kernel. ``block_m``: query rows per tile or step, ``block_n``: keys per tile or step;
    ``tma``: load tiles through TMA descriptors; ``split_mask`` (dK/dV only): separate loops for masked and whole
    query blocks; ``tile_store``: store the output tiles through one int64 tile base and int32
    offsets within the tile instead of a tile of int64 pointers (for dK/dV an sm_90 compile with triton 3.9 spills
    216 instead of 1040 bytes at an earlier d=128 config and needs 168 instead of 244 registers at d=64; on the
    H200 with triton 3.6 it times within 1% of the pointer tiles: 1.6% faster for the d=128 forward while that
    kernel loaded V after the softmax, 0.5% slower since V is loaded next to K, so no pinned config uses it); ``q_rows``
    (dK/dV only): score tiles of (queries, keys), as in the forward, instead of (keys, queries) (see
    ``attention_bwd._dkdv_loop``); ``max_registers``: cap on the registers per thread (triton's ``maxnreg``), None
    for the compiler's choice. A cap that spills nothing can still change the instruction schedule: on an H200
    (triton 3.6, anchor mix, 2026-11-29) the d=128 dQ kernel takes 1.758 ms with 3 stages at 168 registers against
    1.796 ms for the former pin (4 stages, the 177 registers it picks itself), 1.788 ms with 3 stages uncapped, and
    1.761-1.770 ms at caps of 160, 176 and 192 (fwd+bwd of the op: 5.152 instead of 5.177 ms). Caps below what the
    other kernels pick were no faster (d=128 forward: 128-160 registers, 1.30-1.46 ms against 1.30 ms) or
    did not hold up in the op (d=64 dK/dV at 168: 1.221 instead of 1.254 ms alone, but the op's fwd+bwd at one
    8192-token document took 2.40 instead of 2.33 ms, in a run with dependent launches on), and a
    cap that opens a second program per multiprocessor did not beat the pinned tiles (d=128 forward at 128x64, 8
    warps, 2 stages: 1.317 ms capped at 128, 2.05 ms uncapped)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    tma: bool = False
    split_mask: bool = True
    tile_store: bool = False
    q_rows: bool = False
    max_registers: int | None = None

    def __str__(self) -> str:
        flags = ("-tma" if self.tma else "-ptr") + ("" if self.split_mask else "-onemask")
        flags += "-tilestore" if self.tile_store else ""
        flags += "-qrows" if self.q_rows else ""
        flags += f"-r{self.max_registers}" if self.max_registers else ""
        return f"m{self.block_m}n{self.block_n}w{self.num_warps}s{self.num_stages}{flags}"


# (kernel, head-dim class, bits of the input dtype) -> config. Head dims 16 and 32 use the 64 class. The 16-bit
# entries are the winners of bench/attention.py --sweep on an H200 (triton 3.6); rerun it when the compiler or the
# kernels change. fp32 (CUDA-core dots) keeps small tiles that fit its registers and shared memory. Also timed at
# the anchor mix (d=128, 2026-11-29) and slower than the pinned ones: dK/dV 128x64 (8 warps, q_rows) 3.50 ms and
# 128x32 4.07 ms against 2.17 ms; forward 128x64 (8 warps) 1.58-2.04 ms and 128x128 1.71 ms against 1.28 ms.
CONFIGS: dict[tuple[str, int, int], Config] = {
    # head dims 128 and 256: timed at the packed anchor shape; head dim 64: at one 8192-token document (32/8 heads)
    ("fwd", 64, 16): Config(64, 128, 4, 2, tma=True),
    ("fwd", 128, 16): Config(64, 64, 4, 3, tma=True),
    ("fwd", 256, 16): Config(128, 64, 8, 2, tma=True),
    ("dq", 64, 16): Config(64, 64, 4, 3, tma=True),
    ("dq", 128, 16): Config(128, 64, 8, 3, tma=True, max_registers=168),
    ("dq", 256, 16): Config(64, 32, 4, 3, tma=True),
    ("dkdv", 64, 16): Config(64, 64, 4, 3, tma=True, q_rows=True),
    ("dkdv", 128, 16): Config(64, 64, 4, 2, tma=True, q_rows=True),
    ("dkdv", 256, 16): Config(64, 64, 8, 2, tma=True),
    **{(kernel, d, 32): Config(64, 32, 4, 2) for kernel in ("fwd", "dq") for d in (64, 128)},
    **{(kernel, 256, 32): Config(32, 32, 4, 2) for kernel in ("fwd", "dq")},
    **{("dkdv", d, 32): Config(32, 64, 4, 2, split_mask=False) for d in (64, 128)},
    ("dkdv", 256, 32): Config(32, 32, 4, 2, split_mask=False),
}
_INTERPRET_CONFIGS = {"fwd": Config(32, 32, 4, 1), "dq": Config(32, 32, 4, 1), "dkdv": Config(32, 32, 4, 1)}


def default_config(kernel: str, head_dim: int, dtype: torch.dtype) -> Config:
    """The table's config of ``kernel`` ("fwd", "dq" or "dkdv") for this head dim and dtype."""
    if _INTERPRET:
        return _INTERPRET_CONFIGS[kernel]
    return CONFIGS[(kernel, max(head_dim, 64), 32 if dtype == torch.float32 else 16)]


@functools.cache
def _log_once(message: str) -> None:
    logger.warning("veofast.kernels.attention: %s", message)


@functools.cache
def _device_has_tma(device: torch.device) -> bool:
    return _INTERPRET or (device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9)


def _tma_blocker(*tensors: torch.Tensor) -> str | None:
    """None if TMA descriptors of the (tokens, heads * head_dim) views of ``tensors`` are valid, else why not."""
    if not _device_has_tma(tensors[0].device):
        return "TMA needs sm_90 or newer"
    for t in tensors:
        tokens, heads, dim = t.shape
        if tokens == 0 or t.stride(2) != 1 or (heads > 1 and t.stride(1) != dim):
            return f"a (tokens, heads, head_dim) tensor with strides {t.stride()} has no 2-D (tokens, heads*dim) view"
        if t.data_ptr() % 16 or (t.stride(0) * t.element_size()) % 16 or t.stride(0) < heads * dim:
            return f"data or token stride of a {t.dtype} tensor with strides {t.stride()} is not 16-byte aligned"
    return None


def _operands(config: Config, block_rows: list[int], *tensors: torch.Tensor) -> tuple[list, bool]:
    """The kernel's load operands and whether they are TMA descriptors (tensor ``i`` tiled by ``block_rows[i]``
    tokens): descriptors when the config asks for TMA and the tensors allow it, else the tensors (pointers)."""
    if not config.tma:
        return list(tensors), False
    blocker = _tma_blocker(*tensors)
    if blocker is not None:
        _log_once(f"loading through pointers instead of TMA: {blocker}")
        return list(tensors), False
    return [
        TensorDescriptor(t, [t.shape[0], t.shape[1] * t.shape[2]], [t.stride(0), 1], [rows, t.shape[2]])
        for t, rows in zip(tensors, block_rows, strict=True)
    ], True


# Recent tile tables, keyed by what they are computed from. Every layer of a model passes the same cu_seqlens
# tensors, so the forward computes its table once per step instead of once per layer (and the backward two).
_TILE_TABLES: collections.OrderedDict = collections.OrderedDict()
_TILE_TABLES_KEPT = 8


def _tile_table(cu_tiled, cu_q, cu_k, total: int, max_seqlen: int, block: int, reverse: bool):
    """Tile table (TILE_FIELDS, num_slots) int32 of the documents of ``cu_tiled`` cut into ``block`` rows, heaviest
    first (``attention_fwd._schedule_kernel``), and num_slots, an upper bound on the number of tiles.

    Reused while the same ``cu_seqlens`` tensors (same objects, not modified in place since: their version
    counters) come back with the same sizes on the same stream; not while a CUDA graph is being captured (its
    memory belongs to the graph)."""
    cus = (cu_tiled, cu_q, cu_k)
    capturing = cu_tiled.is_cuda and torch.cuda.is_current_stream_capturing()
    key = None
    if not capturing:
        stream = torch.cuda.current_stream(cu_tiled.device).cuda_stream if cu_tiled.is_cuda else 0
        key = (*((id(cu), cu._version) for cu in cus), total, max_seqlen, block, reverse, stream)
        kept = _TILE_TABLES.get(key)
        if kept is not None and all(ref() is cu for ref, cu in zip(kept[0], cus, strict=True)):
            _TILE_TABLES.move_to_end(key)
            return kept[1], kept[2]
    num_docs = cu_tiled.numel() - 1
    num_slots = triton.cdiv(total, block) + num_docs
    tiles = torch.empty((TILE_FIELDS, num_slots), dtype=torch.int32, device=cu_tiled.device)
    tiles[0].fill_(-1)
    num_levels = triton.cdiv(max_seqlen, block)
    if num_levels > 0 and num_docs > 0:
        _schedule_kernel[(num_levels,)](
            cu_tiled, cu_q, cu_k, tiles, num_docs, num_slots, num_levels, BLOCK=block, REVERSE=reverse, DOC_CHUNK=128
        )
    if key is not None:
        _TILE_TABLES[key] = (tuple(weakref.ref(cu) for cu in cus), tiles, num_slots)
        while len(_TILE_TABLES) > _TILE_TABLES_KEPT:
            _TILE_TABLES.popitem(last=False)
    return tiles, num_slots


def _mask_flags(window_left: int, window_right: int, dtype: torch.dtype) -> dict:
    return {
        "HAS_LEFT": window_left >= 0,
        "HAS_RIGHT": window_right >= 0,
        "DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32",
    }


def _heavy_last(window_left: int, window_right: int) -> bool:
    """Whether late query blocks see more keys than early ones (a causal-like mask): the schedule's order."""
    return window_right >= 0 and window_left < 0


def _launch(kernel, grid: int, config: Config, *args, **constexprs) -> None:
    options = {} if config.max_registers is None else {"maxnreg": config.max_registers}
    kernel[(grid,)](
        *args,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        **constexprs,
        **options,
    )


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
    config: Config | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward pass. q: (total_q, Hq, D), k/v: (total_k, Hk, D) with unit last-dim stride; window sides -1 =
    unlimited (causal = ``window_right=0``). Returns out (total_q, Hq, D) in q's dtype and lse (Hq, total_q) fp32."""
    total_q, num_heads, head_dim = q.shape
    config = config or default_config("fwd", head_dim, q.dtype)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((num_heads, total_q), device=q.device, dtype=torch.float32)
    if total_q == 0 or cu_seqlens_q.numel() < 2 or max_seqlen_q == 0:
        return out, lse.fill_(float("inf"))
    tiles, num_slots = _tile_table(
        cu_seqlens_q,
        cu_seqlens_q,
        cu_seqlens_k,
        total_q,
        max_seqlen_q,
        config.block_m,
        not _heavy_last(window_left, window_right),
    )
    bm, bn = config.block_m, config.block_n
    loads, use_tma = _operands(config, [bm, bn, bn], q, k, v)
    _launch(
        _attn_fwd_kernel,
        num_slots * num_heads,
        config,
        *loads,
        out,
        lse,
        tiles,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        out.stride(0),
        out.stride(1),
        num_heads,
        num_slots,
        total_q,
        softmax_scale * math.log2(math.e),
        max(window_left, 0),
        max(window_right, 0),
        num_heads // k.shape[1],
        HEAD_DIM=head_dim,
        NEG_SCALE=softmax_scale < 0,
        TILE_STORE=config.tile_store,
        USE_TMA=use_tma,
        **_mask_flags(window_left, window_right, q.dtype),
    )
    return out, lse


def attention_bwd_dq(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    *,
    softmax_scale: float,
    window_left: int,
    window_right: int,
    config: Config | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """dq (total_q, Hq, D) in q's dtype and delta = rowsum(dout * out) (Hq, total_q) fp32, which the dK/dV kernel
    reads. Needs at least one query and one document."""
    total_q, num_heads, head_dim = q.shape
    config = config or default_config("dq", head_dim, q.dtype)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    delta = torch.empty_like(lse)
    tiles, num_slots = _tile_table(
        cu_seqlens_q,
        cu_seqlens_q,
        cu_seqlens_k,
        total_q,
        max_seqlen_q,
        config.block_m,
        not _heavy_last(window_left, window_right),
    )
    bm, bn = config.block_m, config.block_n
    loads, use_tma = _operands(config, [bm, bn, bn, bm, bm], q, k, v, out, dout)
    _launch(
        _attn_bwd_dq_kernel,
        num_slots * num_heads,
        config,
        *loads,
        lse,
        delta,
        dq,
        tiles,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        out.stride(0),
        out.stride(1),
        dout.stride(0),
        dout.stride(1),
        dq.stride(0),
        dq.stride(1),
        num_heads,
        num_slots,
        total_q,
        softmax_scale,
        softmax_scale * math.log2(math.e),
        max(window_left, 0),
        max(window_right, 0),
        num_heads // k.shape[1],
        HEAD_DIM=head_dim,
        TILE_STORE=config.tile_store,
        USE_TMA=use_tma,
        **_mask_flags(window_left, window_right, q.dtype),
    )
    return dq, delta


def attention_bwd_dkdv(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_k: int,
    *,
    softmax_scale: float,
    window_left: int,
    window_right: int,
    config: Config | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """dk, dv (total_k, Hk, D) in k's dtype, from ``delta`` of ``attention_bwd_dq``. Needs at least one key and
    one document."""
    total_q, num_heads, head_dim = q.shape
    total_k, num_kv_heads, _ = k.shape
    config = config or default_config("dkdv", head_dim, q.dtype)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    tiles, num_slots = _tile_table(
        cu_seqlens_k,
        cu_seqlens_q,
        cu_seqlens_k,
        total_k,
        max_seqlen_k,
        config.block_n,
        _heavy_last(window_left, window_right),
    )
    bm, bn = config.block_m, config.block_n
    loads, use_tma = _operands(config, [bm, bn, bn, bm], q, k, v, dout)
    _launch(
        _attn_bwd_dkdv_kernel,
        num_slots * num_kv_heads,
        config,
        *loads,
        lse,
        delta,
        dk,
        dv,
        tiles,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        dout.stride(0),
        dout.stride(1),
        dk.stride(0),
        dk.stride(1),
        dv.stride(0),
        dv.stride(1),
        num_kv_heads,
        num_slots,
        total_q,
        softmax_scale,
        softmax_scale * math.log2(math.e),
        max(window_left, 0),
        max(window_right, 0),
        num_heads // num_kv_heads,
        HEAD_DIM=head_dim,
        SPLIT_MASK=config.split_mask,
        TILE_STORE=config.tile_store,
        Q_ROWS=config.q_rows,
        USE_TMA=use_tma,
        **_mask_flags(window_left, window_right, q.dtype),
    )
    return dk, dv


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
    dq_config: Config | None = None,
    dkdv_config: Config | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward pass from the forward's ``out`` and ``lse``. dout: (total_q, Hq, D) with unit last-dim stride.
    Returns dq (total_q, Hq, D), dk, dv (total_k, Hk, D), in the inputs' dtype."""
    if cu_seqlens_q.numel() < 2 or q.shape[0] == 0 or k.shape[0] == 0 or max_seqlen_q == 0 or max_seqlen_k == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    window = dict(softmax_scale=softmax_scale, window_left=window_left, window_right=window_right)
    dq, delta = attention_bwd_dq(
        dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, config=dq_config, **window
    )
    dk, dv = attention_bwd_dkdv(
        dout, q, k, v, lse, delta, cu_seqlens_q, cu_seqlens_k, max_seqlen_k, config=dkdv_config, **window
    )
    return dq, dk, dv
