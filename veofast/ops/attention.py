"""Packed varlen attention: many documents concatenated along the token axis, each attending only within itself.

``varlen_attention`` is the public op (Triton on CUDA, the plain-torch reference elsewhere);
``varlen_attention_reference`` is its definition: per-document SDPA, readable, any head dim.

Conventions (flash-attn's ``flash_attn_varlen_func``):
- ``q (total_q, num_q_heads, head_dim)``, ``k``/``v`` ``(total_k, num_kv_heads, head_dim)``; document ``b`` owns
  query rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` and key rows ``cu_seqlens_k[b]:cu_seqlens_k[b+1]``.
- GQA: query head ``h`` reads KV head ``h // (num_q_heads // num_kv_heads)`` (as ``repeat_interleave``).
- Causal masks are bottom-right aligned per document: with ``off = seqlen_k - seqlen_q``, query ``i`` sees key
  ``j`` iff ``j <= i + off`` (the usual causal mask when the lengths agree).
- ``window_size=(left, right)``: query ``i`` sees keys ``i + off - left <= j <= i + off + right``; ``-1`` is
  unlimited; ``causal=True`` sets ``right = 0``.
- A query that sees no key (an empty key document, or a window or bottom-right mask that leaves nothing) gets a
  zero output row and zero gradients. Empty documents (repeated ``cu_seqlens`` entries) are allowed.

Input checks: shapes, dtypes, devices, head counts and window are checked without touching device memory. The
contents of ``cu_seqlens`` (start at 0, non-decreasing, end at the token count, longest document
``<= max_seqlen``) need a device-to-host copy, so they are checked on the torch backend (which reads the
boundaries anyway), when ``check_inputs=True``, and on the Triton path when the tensors are on the CPU (except
while torch.compile traces, where a data-dependent check would break the graph); the Triton path on CUDA trusts
them otherwise, so that a training step never waits on the host.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import math
from types import ModuleType

import torch
import torch.nn.functional as F

from ._backend import casts_like_autocast, on_inputs_device, resolve_backend
from ._eager import direct, with_autograd

__all__ = ["varlen_attention", "varlen_attention_reference"]

logger = logging.getLogger("veofast.ops")
_OP = "varlen_attention"


# --------------------------------------------------------------------------------------------------- input checks
def _check_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, window_size) -> None:
    """Shape/dtype/device checks that never read device memory; raises ``ValueError`` naming the argument."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(
                f"{_OP}: {name} must be a 3-D tensor (tokens, heads, head_dim), got "
                f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}"
            )
        if not t.is_floating_point():
            raise ValueError(f"{_OP}: {name} must be a floating-point tensor, got {t.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"{_OP}: k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"{_OP}: q and k must have the same head_dim, got {q.shape[2]} and {k.shape[2]}")
    if q.shape[2] == 0:
        raise ValueError(f"{_OP}: head_dim (q.shape[2]) must be at least 1, got 0")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{_OP}: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{_OP}: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"{_OP}: num_q_heads ({q.shape[1]}) must be a multiple of num_kv_heads ({k.shape[1]})")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.numel() < 1 or cu.dtype != torch.int32:
            raise ValueError(
                f"{_OP}: {name} must be a 1-D int32 tensor (num_docs + 1,), got "
                f"{(cu.dtype, tuple(cu.shape)) if isinstance(cu, torch.Tensor) else type(cu).__name__}"
            )
        if cu.device != q.device:
            raise ValueError(f"{_OP}: {name} must be on q's device {q.device}, got {cu.device}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(
            f"{_OP}: cu_seqlens_q and cu_seqlens_k must have the same length (num_docs + 1), got "
            f"{cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}"
        )
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(m, bool) or not isinstance(m, (int, torch.SymInt)) or m < 0:
            raise ValueError(f"{_OP}: {name} must be a Python int >= 0, got {m!r}")
    if softmax_scale is not None and not (isinstance(softmax_scale, (int, float)) and math.isfinite(softmax_scale)):
        raise ValueError(f"{_OP}: softmax_scale must be a finite float or None, got {softmax_scale!r}")
    if (
        not isinstance(window_size, (tuple, list))
        or len(window_size) != 2
        or not all(isinstance(w, int) and not isinstance(w, bool) and w >= -1 for w in window_size)
    ):
        raise ValueError(f"{_OP}: window_size must be a pair of ints >= -1 (-1 = unlimited), got {window_size!r}")


def _check_cu_seqlens(cu: torch.Tensor, total: int, max_seqlen: int, name: str, max_name: str) -> list[int]:
    """Check the contents of one ``cu_seqlens`` (one device-to-host copy) and return it as a list."""
    bounds = cu.tolist()
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    if bounds[0] != 0:
        raise ValueError(f"{_OP}: {name} must start at 0, got {bounds[0]}")
    if any(n < 0 for n in lengths):
        raise ValueError(f"{_OP}: {name} must be non-decreasing, got {bounds}")
    if bounds[-1] != total:
        raise ValueError(f"{_OP}: {name}[-1] ({bounds[-1]}) must equal the number of tokens ({total})")
    if lengths and max(lengths) > max_seqlen:
        raise ValueError(f"{_OP}: {max_name} ({max_seqlen}) is smaller than the longest document ({max(lengths)})")
    return bounds


def _window(causal: bool, window_size) -> tuple[int, int]:
    left, right = window_size
    return left, 0 if causal else right


# ------------------------------------------------------------------------------------------------------ reference
def varlen_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
) -> torch.Tensor:
    """Plain-torch packed varlen attention: SDPA per document (the CPU backend and the test oracle).

    q: (total_q, num_q_heads, head_dim); k, v: (total_k, num_kv_heads, head_dim); cu_seqlens_q/k: (num_docs + 1,)
    int32. Returns (total_q, num_q_heads, head_dim) in q's dtype. Reads ``cu_seqlens`` on the host (checked).
    See the module docstring for the masking conventions.
    """
    _check_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, window_size)
    bounds_q = _check_cu_seqlens(cu_seqlens_q, q.shape[0], max_seqlen_q, "cu_seqlens_q", "max_seqlen_q")
    bounds_k = _check_cu_seqlens(cu_seqlens_k, k.shape[0], max_seqlen_k, "cu_seqlens_k", "max_seqlen_k")
    left, right = _window(causal, window_size)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    gqa = q.shape[1] != k.shape[1]
    outs = []
    for q0, q1, k0, k1 in zip(bounds_q[:-1], bounds_q[1:], bounds_k[:-1], bounds_k[1:], strict=True):
        len_q, len_k = q1 - q0, k1 - k0
        if len_q == 0:
            continue
        if len_k == 0:
            outs.append(q.new_zeros((len_q, q.shape[1], v.shape[2])))
            continue
        qd, kd, vd = q[q0:q1].transpose(0, 1), k[k0:k1].transpose(0, 1), v[k0:k1].transpose(0, 1)
        if left < 0 and right < 0:
            od = F.scaled_dot_product_attention(qd, kd, vd, scale=scale, enable_gqa=gqa)
        elif left < 0 and right == 0 and len_q == len_k:
            od = F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, scale=scale, enable_gqa=gqa)
        else:
            i = torch.arange(len_q, device=q.device)[:, None] + (len_k - len_q)
            j = torch.arange(len_k, device=q.device)[None, :]
            mask = torch.ones((len_q, len_k), dtype=torch.bool, device=q.device)
            if right >= 0:
                mask &= j <= i + right
            if left >= 0:
                mask &= j >= i - left
            blind = ~mask.any(dim=1)  # queries that see no key: unmask them (no NaN), then zero their rows
            od = F.scaled_dot_product_attention(
                qd, kd, vd, attn_mask=mask | blind[:, None], scale=scale, enable_gqa=gqa
            )
            od = od.masked_fill(blind[None, :, None], 0.0)
        outs.append(od.transpose(0, 1))
    # The empty tail adds no row; it keeps q, k and v in the output's autograd graph (zero gradients, as on the
    # Triton path) when no row attends to a key: no query tokens, or no document with keys.
    return torch.cat([*outs, q[:0] + k[:0, :1] + v[:0, :1]], dim=0)


# The reference loops over the documents it reads from cu_seqlens on the host: traced by torch.compile, each new
# number of documents compiled a new graph (a packed batch's count changes every step). A compiled caller runs it
# eagerly, behind a graph break.
_reference_untraced = torch.compiler.disable(varlen_attention_reference)


# ---------------------------------------------------------------------------------------------------- triton path
def _kernels() -> ModuleType:
    """The Triton launchers (``kernels/attention.py``, installed as ``veofast.kernels``), imported on first use so
    the torch path never imports triton."""
    return importlib.import_module("veofast.kernels.attention")


# What the Triton kernels take (kernels/attention.py). Other head dims up to the largest run zero-padded to the
# next one (``_kernel_head_dim``).
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TRITON_HEAD_DIMS = (16, 32, 64, 128, 256)


def _triton_unsupported(q: torch.Tensor) -> str | None:
    """Why the Triton kernels cannot take these inputs, or None."""
    if q.dtype not in _TRITON_DTYPES:
        return f"q.dtype {q.dtype} is not one of {_TRITON_DTYPES}"
    if q.shape[2] > _TRITON_HEAD_DIMS[-1]:
        return f"head_dim {q.shape[2]} is above {_TRITON_HEAD_DIMS[-1]}"
    return None


def _kernel_head_dim(head_dim: int) -> int:
    """The smallest head dim the kernels are built for that holds ``head_dim`` (<= 256)."""
    return next(d for d in _TRITON_HEAD_DIMS if d >= head_dim)


@functools.cache
def _log_fallback_once(reason: str) -> None:
    logger.warning("veofast.ops.%s: using the torch reference because %s", _OP, reason)


def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _fwd_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
    window_left: int,
    window_right: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton forward: (out (total_q, Hq, D), lse (Hq, total_q) fp32)."""
    return _kernels().varlen_attention_fwd(
        _unit_stride(q),
        _unit_stride(k),
        _unit_stride(v),
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        softmax_scale=softmax_scale,
        window_left=window_left,
        window_right=window_right,
    )


_fwd_op = torch.library.custom_op("veofast::varlen_attention_fwd", _fwd_impl, mutates_args=())


@_fwd_op.register_fake
def _fwd_fake(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, window_left, window_right
):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(
        (q.shape[1], q.shape[0]), dtype=torch.float32
    )


def _bwd_impl(
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
    softmax_scale: float,
    window_left: int,
    window_right: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton backward: (dq, dk, dv) shaped like q, k, v."""
    return _kernels().varlen_attention_bwd(
        _unit_stride(dout),
        _unit_stride(q),
        _unit_stride(k),
        _unit_stride(v),
        out,
        lse,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        softmax_scale=softmax_scale,
        window_left=window_left,
        window_right=window_right,
    )


_bwd_op = torch.library.custom_op("veofast::varlen_attention_bwd", _bwd_impl, mutates_args=())


@_bwd_op.register_fake
def _bwd_fake(
    dout,
    q,
    k,
    v,
    out,
    lse,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    softmax_scale,
    window_left,
    window_right,
):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


_bwd = direct(_bwd_op, _bwd_impl)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, cu_seqlens_q, cu_seqlens_k, *scalars = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k)
    ctx.scalars = scalars


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
    dq, dk, dv = _bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, *ctx.scalars)
    return dq, dk, dv, None, None, None, None, None, None, None


_fwd = with_autograd(_fwd_op, _fwd_impl, _backward, _setup_context)


# --------------------------------------------------------------------------------------------------------- public
@on_inputs_device
@casts_like_autocast("q", "k", "v")
def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    backend: str = "auto",
    check_inputs: bool = False,
) -> torch.Tensor:
    """Attention over packed documents, each attending only within itself.

    q: (total_q, num_q_heads, head_dim); k, v: (total_k, num_kv_heads, head_dim), num_q_heads a multiple of
    num_kv_heads; cu_seqlens_q/k: (num_docs + 1,) int32 document boundaries on q's device; max_seqlen_q/k: Python
    ints, at least the longest document. ``softmax_scale`` defaults to ``head_dim ** -0.5``. Returns
    (total_q, num_q_heads, head_dim) in q's dtype. Causal masks are bottom-right aligned per document and
    ``window_size`` follows flash-attn (module docstring). Inside ``torch.autocast`` q, k and v are first cast to the
    autocast dtype, as SDPA's are, and the op runs as it would on those (``casts_like_autocast``).

    ``backend``: ``"auto"`` (Triton on CUDA, the reference elsewhere; on CUDA, inputs the kernels do not support
    — float64, a head dim above 256 — go to the reference with a one-time warning), ``"triton"`` (fp16/bf16/fp32;
    ValueError for unsupported inputs) or ``"torch"``. The kernels are built for head dims 16, 32, 64, 128 and
    256; others (80, 96, 192, ...) run zero-padded to the next of these (copies of q, k, v, the output and their
    gradients: at the anchor mix of ``bench/attention.py`` on an H200, fwd+bwd took 6.3 ms at d=96 and 5.3 ms at
    d=128).
    ``check_inputs=True`` also checks the contents of ``cu_seqlens`` on the Triton path on CUDA (one device-to-host
    copy); see the module docstring.
    Non-finite inputs: finite values never cross documents, and a NaN or inf stays within its document on the
    torch path and on the Triton pointer path. On the Triton TMA path (fp16/bf16 on sm90+) it can also reach the
    outputs and gradients of documents that end within one tile (at most 128 tokens) before its token, through
    ``0 * NaN`` (``kernels/attention_fwd.py``); a NaN anywhere makes the step's loss NaN anyway.
    Raises ValueError naming the argument, before any kernel runs, for shapes, dtypes, devices, head counts,
    ``max_seqlen``, ``softmax_scale`` or ``window_size`` other than these, and for ``cu_seqlens`` contents where
    they are checked.
    """
    _check_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, window_size)
    chosen = resolve_backend(_OP, backend, q.device)
    if chosen == "triton":
        reason = _triton_unsupported(q)
        if reason is not None:
            if backend == "triton":
                raise ValueError(f"{_OP}: backend='triton' cannot run: {reason}")
            _log_fallback_once(reason)
            chosen = "torch"
    if chosen == "torch":
        return _reference_untraced(
            q,
            k,
            v,
            cu_seqlens_q,
            cu_seqlens_k,
            max_seqlen_q,
            max_seqlen_k,
            causal=causal,
            softmax_scale=softmax_scale,
            window_size=window_size,
        )
    if check_inputs or (q.device.type == "cpu" and not torch.compiler.is_compiling()):
        _check_cu_seqlens(cu_seqlens_q, q.shape[0], max_seqlen_q, "cu_seqlens_q", "max_seqlen_q")
        _check_cu_seqlens(cu_seqlens_k, k.shape[0], max_seqlen_k, "cu_seqlens_k", "max_seqlen_k")
    left, right = _window(causal, tuple(window_size))
    head_dim = q.shape[-1]
    scale = head_dim**-0.5 if softmax_scale is None else float(softmax_scale)
    padded = _kernel_head_dim(head_dim)
    if padded != head_dim:  # zero columns add nothing to Q K^T and come out as zero columns of the output
        q, k, v = (F.pad(t, (0, padded - head_dim)) for t in (q, k, v))
    cu_seqlens_q, cu_seqlens_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()  # the kernels read them flat
    out, _ = _fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, left, right)
    # A contiguous copy, not a strided view of the padded output: the same layout as the torch backend gives
    return out if padded == head_dim else out[..., :head_dim].contiguous()
