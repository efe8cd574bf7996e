"""MoE expert computation: token permutation, grouped expert GEMMs, the expert FFN and the whole routed FFN.

Expert weights use the layout of transformers' Qwen3-MoE experts: ``gate_up_proj (E, 2*I, H)`` with the gate in
rows ``[0, I)`` and the up projection in rows ``[I, 2*I)``, and ``down_proj (E, H, I)``. Expert e computes
``y = (silu(x @ Wg.T) * (x @ Wu.T)) @ Wd.T``. The routed FFN of token t is ``sum_k w[t, k] * expert_{ids[t, k]}(x_t)``.

Public ops (each with ``backend="auto" | "triton" | "torch"``):

- ``moe_permute``: tokens to rows grouped by expert (``MoEPermutation``); differentiable wrt ``hidden``.
- ``moe_unpermute``: rows back to tokens, weighted and summed in fp32; differentiable wrt rows and weights.
- ``grouped_mm``: ``rows of expert e @ w[e]``; differentiable wrt both.
- ``expert_ffn``: grouped gate/up GEMM -> SwiGLU -> grouped down GEMM on rows grouped by expert (what an
  expert-parallel dispatcher calls on its local experts).
- ``moe_ffn``: permute -> expert_ffn -> unpermute, the MoE layer's fast path.

``*_reference`` functions are plain torch, readable, and the definition of each op (the CPU path and the test
oracle). The Triton path is deterministic: within an expert, rows keep the order of the flattened ``(token, slot)``
index. Its grouped GEMMs run on ``torch._grouped_mm`` for bf16 on Hopper (sm90), and on our own Triton kernels
otherwise; they take fp16, bf16 and fp32: for other dtypes (float64) ``grouped_mm``, ``expert_ffn`` and ``moe_ffn``
run on the references with ``backend="auto"`` (logged once on CUDA) and raise ValueError with ``"triton"``.

Expert ids. ``moe_permute`` and ``moe_ffn`` check that the ids lie in ``[0, num_experts)`` and raise ValueError
before any kernel runs; on a GPU that check is the one host sync of the op. ``check_ids=False`` skips it where the
ids are known to be in range (a router's top-k over ``num_experts`` logits: the models pass it, so their MoE
layers make no host sync); the Triton path then ignores an id outside the range (the slot gets ``row_index = -1``,
moves no row and adds nothing), and rows past ``expert_offsets[-1]`` hold undefined values. The references always
check.

Input checks. Every op raises ValueError naming the argument (TypeError for a non-tensor) before any kernel runs
for shapes, dtypes or devices other than its docstring gives: at least one expert (E >= 1) and one slot per token
(K >= 1), expert weights in the activations' dtype, index tensors int32 or int64 (``expert_offsets`` int32).

Local experts (expert parallelism). ``moe_permute`` and ``moe_ffn`` take ``first_expert``: the ``E`` experts at
hand are then ids ``[first_expert, first_expert + E)`` of a larger set, and slots routed to any other id are
dropped on both paths (``row_index = -1``: no row, nothing added), with no range check. ``num_rows`` sizes the
permuted rows exactly when the caller knows how many slots are kept (an EP rank learns it from its count
exchange), so that no work or memory goes to rows that hold nothing.
"""

from __future__ import annotations

import functools
import logging
from typing import NamedTuple

import torch
import torch.nn.functional as F

from veofast.ops._backend import casts_like_autocast, on_inputs_device, resolve_backend, triton_or_fallback
from veofast.ops._eager import first_order_only

logger = logging.getLogger("veofast.ops")

_INDEX_DTYPES = (torch.int32, torch.int64)
# Slots (T*K) and permuted rows are counted by int32 indices (row_index, expert_offsets, the kernels' slot indices).
_MAX_SLOTS = 2**31 - 1
# What the grouped GEMM kernels take; other dtypes (float64) run on the references.
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class MoEPermutation(NamedTuple):
    """Tokens regrouped by expert (``T`` tokens, ``K`` experts per token, ``E`` experts).

    rows: (T*K, H) token copies, grouped by expert in expert order; within an expert, in ``(t, k)`` order.
    expert_offsets: (E,) int32 cumulative END rows (``torch._grouped_mm``'s ``offs``): expert e owns rows
        ``[expert_offsets[e-1], expert_offsets[e])``.
    row_index: (T*K,) int32: flattened ``(t, k)`` -> its row in ``rows`` (-1 for an invalid id on the Triton path).
    tokens_per_expert: (E,) int64 rows per expert (``torch.bincount``'s dtype; the splits an all-to-all needs).
    """

    rows: torch.Tensor
    expert_offsets: torch.Tensor
    row_index: torch.Tensor
    tokens_per_expert: torch.Tensor


# ----------------------------------------------------------------------------------------------- input checks


def _check_float(name: str, t: torch.Tensor, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if not t.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _check_index(name: str, t: torch.Tensor, ndim: int, dtypes: tuple[torch.dtype, ...] = _INDEX_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype in {dtypes}, got {t.dtype}")


def _check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all tensors must be on one device, got {devices}")


def _check_routing(topk_ids: torch.Tensor, num_tokens: int) -> None:
    _check_index("topk_ids", topk_ids, 2)
    if topk_ids.shape[0] != num_tokens or topk_ids.shape[1] == 0:
        raise ValueError(
            f"topk_ids must have shape (T, K) with T = {num_tokens} tokens and K >= 1, got {tuple(topk_ids.shape)}"
        )
    if topk_ids.numel() > _MAX_SLOTS:
        raise ValueError(
            f"topk_ids has T*K = {topk_ids.numel()} slots, more than the 2**31 - 1 supported (row_index and "
            "expert_offsets are int32)"
        )


def _check_num_rows(num_rows: int | None) -> None:
    _check_count("num_rows", num_rows, 0, optional=True)
    if num_rows is not None and num_rows > _MAX_SLOTS:
        raise ValueError(f"num_rows must be at most 2**31 - 1 (row indices are int32), got {num_rows}")


def _check_ids_in_range(topk_ids: torch.Tensor, num_experts: int) -> None:
    """ValueError unless every id is in ``[0, num_experts)`` (a host sync on a GPU)."""
    if topk_ids.numel() and (int(topk_ids.min()) < 0 or int(topk_ids.max()) >= num_experts):
        raise ValueError(
            f"topk_ids must lie in [0, num_experts={num_experts}), got values in "
            f"[{int(topk_ids.min())}, {int(topk_ids.max())}]"
        )


def _check_offsets(expert_offsets: torch.Tensor, num_experts: int) -> None:
    _check_index("expert_offsets", expert_offsets, 1, (torch.int32,))
    if expert_offsets.shape[0] != num_experts:
        raise ValueError(
            f"expert_offsets must have one entry per expert ({num_experts}), got {expert_offsets.shape[0]}"
        )


def _check_offsets_values(expert_offsets: torch.Tensor, num_rows: int) -> None:
    """Host-syncing check, for the torch path only: non-decreasing ends within ``[0, num_rows]``."""
    ends = expert_offsets.long()
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    if bool((ends < starts).any()) or (ends.numel() and int(ends[-1]) > num_rows):
        raise ValueError(
            f"expert_offsets must be non-decreasing cumulative ends within [0, {num_rows}], got {ends.tolist()}"
        )


def _check_expert_weights(
    gate_up_proj: torch.Tensor, down_proj: torch.Tensor, activations: torch.Tensor, name: str
) -> None:
    """The expert weights against the activations ``name`` (hidden or rows): (E >= 1, 2*I, H), (E, H, I), same dtype."""
    _check_float("gate_up_proj", gate_up_proj, 3)
    _check_float("down_proj", down_proj, 3)
    num_experts, two_inter, width = gate_up_proj.shape
    hidden_size, dtype = activations.shape[1], activations.dtype
    if num_experts == 0 or width != hidden_size or two_inter % 2:
        raise ValueError(
            f"gate_up_proj must have shape (E, 2*I, H={hidden_size}) with E >= 1, got {tuple(gate_up_proj.shape)}"
        )
    expected = (num_experts, hidden_size, two_inter // 2)
    if tuple(down_proj.shape) != expected:
        raise ValueError(f"down_proj must have shape (E, H, I) = {expected}, got {tuple(down_proj.shape)}")
    for weight_name, t in (("gate_up_proj", gate_up_proj), ("down_proj", down_proj)):
        if t.dtype != dtype:
            raise ValueError(f"{weight_name} must have {name}'s dtype {dtype}, got {t.dtype}")


def _gemm_backend(op: str, backend: str, x: torch.Tensor) -> str:
    """``resolve_backend`` for an op that runs grouped GEMMs on ``x``'s dtype: dtypes the kernels do not take
    (float64) go to the reference with ``"auto"`` (logged once) and raise ValueError with ``"triton"``."""
    chosen = resolve_backend(op, backend, x.device)
    if chosen == "triton" and x.dtype not in _TRITON_DTYPES:
        reason = f"the triton backend takes {_TRITON_DTYPES}, got {x.dtype}"
        chosen = triton_or_fallback(op, backend, reason)
    return chosen


# -------------------------------------------------------------------------------------------------- references


def moe_permute_reference(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    num_experts: int,
    *,
    first_expert: int | None = None,
    num_rows: int | None = None,
) -> MoEPermutation:
    """Rows grouped by expert by a stable argsort of the flattened ids. hidden: (T, H); topk_ids: (T, K).

    With ``first_expert`` the experts are ids ``[first_expert, first_expert + num_experts)`` and other slots are
    dropped (``row_index`` -1). ``rows`` has ``num_rows`` rows (default ``T*K``; zeros past the kept ones).
    """
    num_tokens, topk = topk_ids.shape
    num_rows = num_tokens * topk if num_rows is None else num_rows
    if first_expert is None:
        _check_ids_in_range(topk_ids, num_experts)
    flat = topk_ids.reshape(-1).long() - (first_expert or 0)
    kept = (flat >= 0) & (flat < num_experts)
    num_kept = int(kept.sum())
    if num_kept > num_rows:
        raise ValueError(f"num_rows={num_rows} is fewer than the {num_kept} slots routed to these experts")
    order = torch.argsort(torch.where(kept, flat, num_experts), stable=True)[:num_kept]  # row -> flat (t, k)
    row_index = torch.full_like(flat, -1)
    row_index[order] = torch.arange(num_kept, device=flat.device)
    tokens_per_expert = torch.bincount(flat[kept], minlength=num_experts)
    expert_offsets = tokens_per_expert.cumsum(0).to(torch.int32)
    rows = torch.cat([hidden[order // topk], hidden.new_zeros(num_rows - num_kept, hidden.shape[1])])
    return MoEPermutation(rows, expert_offsets, row_index.to(torch.int32), tokens_per_expert)


def moe_unpermute_reference(rows: torch.Tensor, row_index: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """out[t] = sum_k topk_weights[t, k] * rows[row_index[t*K + k]], summed in fp32 (float64 for float64 rows), in
    rows' dtype. A slot with ``row_index`` -1 (dropped) adds nothing, also when the row it would read or its weight
    is not finite, and it gets and gives no gradient.

    rows: (R, H); row_index: (T*K,); topk_weights: (T, K). Returns (T, H).
    """
    num_tokens, topk = topk_weights.shape
    if row_index.numel() and (int(row_index.min()) < -1 or int(row_index.max()) >= rows.shape[0]):
        raise ValueError(f"row_index must lie in [0, rows.shape[0]={rows.shape[0]}) or be -1 (a dropped slot)")
    acc = torch.promote_types(rows.dtype, torch.float32)
    kept = (row_index >= 0).view(num_tokens, topk)
    # A dropped slot reads row 0 (a placeholder for the gather); ``where``, not a zero weight, keeps it out: 0 * NaN
    # or 0 * inf from another token's row (or, in the backward pass, from this token's gradient) would be NaN.
    gathered = rows[row_index.long().clamp(min=0)].view(num_tokens, topk, rows.shape[1]).to(acc)
    gathered = torch.where(kept.unsqueeze(-1), gathered, 0.0)
    weights = torch.where(kept, topk_weights.to(acc), 0.0)
    return (gathered * weights.unsqueeze(-1)).sum(1).to(rows.dtype)


def grouped_mm_reference(x: torch.Tensor, w: torch.Tensor, expert_offsets: torch.Tensor) -> torch.Tensor:
    """out[s_e:t_e] = x[s_e:t_e] @ w[e], a loop over experts. x: (M, K); w: (E, K, N). Rows past the last end: 0."""
    _check_offsets_values(expert_offsets, x.shape[0])
    ends = expert_offsets.tolist()
    starts = [0] + ends[:-1]
    pieces = [x[s:e] @ w[i] for i, (s, e) in enumerate(zip(starts, ends, strict=True))]
    pieces.append(x.new_zeros(x.shape[0] - (ends[-1] if ends else 0), w.shape[2]))
    return torch.cat(pieces)


def expert_ffn_reference(
    rows: torch.Tensor, expert_offsets: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor
) -> torch.Tensor:
    """The expert FFN on rows grouped by expert: (M, H) -> (M, H), with ``grouped_mm_reference``."""
    gate, up = grouped_mm_reference(rows, gate_up_proj.transpose(1, 2), expert_offsets).chunk(2, dim=-1)
    return grouped_mm_reference(F.silu(gate) * up, down_proj.transpose(1, 2), expert_offsets)


def moe_ffn_reference(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    *,
    first_expert: int | None = None,
) -> torch.Tensor:
    """The routed expert FFN, the definition: a loop over experts, each on the tokens routed to it.

    hidden: (T, H); topk_ids: (T, K) int; topk_weights: (T, K); gate_up_proj: (E, 2I, H); down_proj: (E, H, I).
    With ``first_expert`` the weights are experts ``[first_expert, first_expert + E)`` and slots routed elsewhere
    add nothing. Expert matmuls run in hidden's dtype; the weighted combine is summed in fp32 (float64 for float64
    inputs). Returns (T, H), hidden's dtype.
    """
    num_experts = gate_up_proj.shape[0]
    if first_expert is None:
        _check_ids_in_range(topk_ids, num_experts)
    acc = torch.promote_types(hidden.dtype, torch.float32)
    out = torch.zeros(hidden.shape, dtype=acc, device=hidden.device)
    for e in range(num_experts):
        token, slot = torch.nonzero(topk_ids == e + (first_expert or 0), as_tuple=True)
        x = hidden[token]
        gate, up = (x @ gate_up_proj[e].T).chunk(2, dim=-1)
        y = (F.silu(gate) * up) @ down_proj[e].T
        out = out.index_add(0, token, y.to(acc) * topk_weights[token, slot].to(acc).unsqueeze(-1))
    return out.to(hidden.dtype)


# --------------------------------------------------------------------------------------- Triton path: kernels


def _kernels():
    """The Triton launchers, imported on first use so that the torch path needs no triton."""
    from veofast.kernels import grouped_gemm, moe, moe_permute

    return moe_permute, grouped_gemm, moe


@functools.cache
def _log_once(reason: str) -> None:
    logger.warning(
        "veofast.ops.grouped_mm: using veofast's Triton grouped GEMM instead of torch._grouped_mm: %s", reason
    )


def _torch_grouped_mm_ok(*mats: torch.Tensor, out_cols: int) -> bool:
    """Whether ``torch._grouped_mm`` can take these operands (2-D ones must be row-major) and an output with
    ``out_cols`` columns: bf16 CUDA tensors on sm90 with 16-byte aligned data and leading strides. Elsewhere our
    Triton kernels run (logged once for bf16)."""
    first = mats[0]
    if not first.is_cuda or first.dtype != torch.bfloat16:
        return False
    if not hasattr(torch, "_grouped_mm"):
        _log_once("this torch has no torch._grouped_mm")
        return False
    major = torch.cuda.get_device_capability(first.device)[0]
    if major != 9:
        _log_once(f"its CUTLASS path is used on sm90 only, this GPU is sm{major}x")
        return False
    if any(m.numel() == 0 for m in mats):
        return False
    if out_cols % 8:
        _log_once(f"an output row of {out_cols} bf16 values is not a multiple of 16 bytes")
        return False
    for m in mats:
        row_stride, col_stride = m.stride(-2), m.stride(-1)
        row_major = col_stride == 1 and row_stride % 8 == 0 and row_stride >= m.shape[-1]
        col_major = m.dim() == 3 and row_stride == 1 and col_stride % 8 == 0 and col_stride >= m.shape[-2]
        if m.data_ptr() % 16 or not (row_major or col_major):
            _log_once(f"an operand of shape {tuple(m.shape)} and strides {m.stride()} is not 16-byte aligned")
            return False
    return True


def _gmm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """(M, K) x (E, K, N) -> (M, N), rows of expert e times w[e]."""
    x = x if x.stride(1) == 1 else x.contiguous()
    if _torch_grouped_mm_ok(x, w, out_cols=w.shape[2]):
        return torch._grouped_mm(x, w, offs=offsets)
    return _kernels()[1].grouped_mm(x, w, offsets)


def _gmm_wgrad(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """(M, P) x (M, Q) -> (E, P, Q), out[e] = a[rows of e].T @ b[rows of e] (zeros for an empty expert)."""
    a = a if a.stride(1) == 1 else a.contiguous()
    b = b if b.stride(1) == 1 else b.contiguous()
    if _torch_grouped_mm_ok(a, b, out_cols=b.shape[1]):
        return torch._grouped_mm(a.t(), b, offs=offsets)
    return _kernels()[1].grouped_mm_wgrad(a, b, offsets)


def _zero_rows_past_last_expert(grad: torch.Tensor, expert_offsets: torch.Tensor) -> torch.Tensor:
    """The grouped GEMMs leave rows at or past ``expert_offsets[-1]`` unwritten; as input gradients those rows are
    0 (they take no part), set without a host sync."""
    if expert_offsets.numel() == 0:
        return grad.zero_()
    return _kernels()[1].zero_rows_from(grad, expert_offsets[-1:])


class _MoEPermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, topk_ids, num_experts, first_expert, num_rows):
        rows, expert_offsets, row_index, tokens_per_expert = _kernels()[0].permute(
            hidden, topk_ids, num_experts, first_expert=first_expert or 0, num_rows=num_rows
        )
        ctx.mark_non_differentiable(expert_offsets, row_index, tokens_per_expert)
        ctx.save_for_backward(row_index)
        ctx.num_tokens, ctx.topk = topk_ids.shape
        return rows, expert_offsets, row_index, tokens_per_expert

    @staticmethod
    @first_order_only("moe_permute")
    def backward(ctx, grad_rows, *_):
        (row_index,) = ctx.saved_tensors
        grad_hidden = _kernels()[0].unpermute(grad_rows, row_index, None, ctx.num_tokens, ctx.topk)
        return grad_hidden, None, None, None, None


class _MoEUnpermute(torch.autograd.Function):
    """``zero_unreferenced_rows``: give rows that no slot refers to a zero gradient also when R = T*K (the public
    op); ``moe_ffn`` leaves them unwritten, as nothing reads them (the expert FFN's backward skips rows past the last
    expert)."""

    @staticmethod
    def forward(ctx, rows, row_index, topk_weights, zero_unreferenced_rows):
        ctx.save_for_backward(rows, row_index, topk_weights)
        ctx.zero_unreferenced_rows = zero_unreferenced_rows
        num_tokens, topk = topk_weights.shape
        return _kernels()[0].unpermute(rows, row_index, topk_weights, num_tokens, topk)

    @staticmethod
    @first_order_only("moe_unpermute")
    def backward(ctx, grad_out):
        rows, row_index, topk_weights = ctx.saved_tensors
        grad_rows, grad_weights = _kernels()[0].unpermute_backward(
            grad_out,
            rows,
            row_index,
            topk_weights,
            rows_grad=ctx.needs_input_grad[0],
            weights_grad=ctx.needs_input_grad[2],
            zero_unreferenced_rows=ctx.zero_unreferenced_rows,
        )
        return grad_rows, None, grad_weights, None


class _GroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, expert_offsets):
        ctx.save_for_backward(x, w, expert_offsets)
        return _gmm(x, w, expert_offsets)

    @staticmethod
    @first_order_only("grouped_mm")
    def backward(ctx, grad_out):
        x, w, expert_offsets = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_x = _gmm(grad_out, w.transpose(1, 2), expert_offsets) if ctx.needs_input_grad[0] else None
        if grad_x is not None:
            grad_x = _zero_rows_past_last_expert(grad_x, expert_offsets)
        grad_w = _gmm_wgrad(x, grad_out, expert_offsets) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w, None


class _ExpertFFN(torch.autograd.Function):
    """Keeps rows and the gate/up projection h for backward; the SwiGLU output is recomputed there."""

    @staticmethod
    def forward(ctx, rows, expert_offsets, gate_up_proj, down_proj):
        h = _gmm(rows, gate_up_proj.transpose(1, 2), expert_offsets)  # (M, 2I)
        a = _kernels()[2].swiglu(h, expert_offsets[-1:])  # (M, I); rows past the last expert stay unset
        ctx.save_for_backward(rows, expert_offsets, gate_up_proj, down_proj, h)
        return _gmm(a, down_proj.transpose(1, 2), expert_offsets)  # (M, H)

    @staticmethod
    @first_order_only("expert_ffn")
    def backward(ctx, grad_out):
        rows, expert_offsets, gate_up_proj, down_proj, h = ctx.saved_tensors
        need_rows, _, need_gate_up, need_down = ctx.needs_input_grad
        grad_out = grad_out.contiguous()
        grad_a = _gmm(grad_out, down_proj, expert_offsets)  # (M, I)
        grad_h, a = _kernels()[2].swiglu_backward(h, grad_a, expert_offsets[-1:])
        grad_down = _gmm_wgrad(grad_out, a, expert_offsets) if need_down else None  # (E, H, I)
        grad_rows = _gmm(grad_h, gate_up_proj, expert_offsets) if need_rows else None  # (M, H)
        if grad_rows is not None:
            grad_rows = _zero_rows_past_last_expert(grad_rows, expert_offsets)
        grad_gate_up = _gmm_wgrad(grad_h, rows, expert_offsets) if need_gate_up else None  # (E, 2I, H)
        return grad_rows, None, grad_gate_up, grad_down


# ------------------------------------------------------------------------------------------------- public ops


# torch.compile does not trace into the Triton path (its launchers, host-side tile planning and
# ``torch._grouped_mm`` calls): a compiled model runs it eagerly, forward and backward, behind a graph break. Traced,
# it failed under the Triton interpreter and did not finish compiling within 4 minutes on an H200 (bf16, T=37).
@torch.compiler.disable
def _run_eagerly(function: type[torch.autograd.Function], *args):
    """``function.apply(*args)``, outside torch.compile's tracing."""
    return function.apply(*args)


@torch.compiler.disable
def _triton_moe_ffn(hidden, topk_ids, topk_weights, gate_up_proj, down_proj, first_expert, num_rows) -> torch.Tensor:
    """``moe_ffn``'s Triton path (arguments as there, checked): permute -> expert FFN -> unpermute, outside
    torch.compile's tracing as ``_run_eagerly``."""
    rows, expert_offsets, row_index, _ = _MoEPermute.apply(
        hidden, topk_ids, gate_up_proj.shape[0], first_expert, num_rows
    )
    out_rows = _ExpertFFN.apply(rows, expert_offsets, gate_up_proj, down_proj)
    return _MoEUnpermute.apply(out_rows, row_index, topk_weights, False)


def _check_count(name: str, value, minimum: int, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}{' or None' if optional else ''}, got {value!r}")


@on_inputs_device
def moe_permute(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    num_experts: int,
    *,
    first_expert: int | None = None,
    num_rows: int | None = None,
    check_ids: bool = True,
    backend: str = "auto",
) -> MoEPermutation:
    """Copies each token once per chosen expert into rows grouped by expert; differentiable wrt ``hidden``.

    hidden: (T, H) float; topk_ids: (T, K) int32/int64 in ``[0, num_experts)``. See ``MoEPermutation``.
    first_expert: the experts are ids ``[first_expert, first_expert + num_experts)``; slots routed elsewhere are
    dropped (``row_index`` -1). num_rows: rows to allocate (default ``T*K``); at least the number of kept slots
    (the torch path checks; on the Triton path the slots past it are dropped). check_ids: see the module docstring.
    """
    _check_float("hidden", hidden, 2)
    _check_routing(topk_ids, hidden.shape[0])
    _check_same_device(hidden=hidden, topk_ids=topk_ids)
    _check_count("num_experts", num_experts, 1)
    _check_count("first_expert", first_expert, 0, optional=True)
    _check_num_rows(num_rows)
    if check_ids and first_expert is None:
        _check_ids_in_range(topk_ids, num_experts)
    if resolve_backend("moe_permute", backend, hidden.device) == "torch":
        return moe_permute_reference(hidden, topk_ids, num_experts, first_expert=first_expert, num_rows=num_rows)
    return MoEPermutation(*_run_eagerly(_MoEPermute, hidden, topk_ids, num_experts, first_expert, num_rows))


@on_inputs_device
def moe_unpermute(
    rows: torch.Tensor, row_index: torch.Tensor, topk_weights: torch.Tensor, *, backend: str = "auto"
) -> torch.Tensor:
    """out[t] = sum_k topk_weights[t, k] * rows[row_index[t*K + k]], summed in fp32; differentiable wrt ``rows``
    and ``topk_weights``.

    rows: (R, H) float; row_index: (T*K,) int32/int64 (``MoEPermutation.row_index``); topk_weights: (T, K) float.
    Returns (T, H) in rows' dtype; ``topk_weights``' gradient has its dtype. A row that no slot refers to gets a
    zero gradient (on the Triton path with R = T*K, for a ``row_index`` from ``moe_permute``, whose routed rows come
    first).
    """
    _check_float("rows", rows, 2)
    _check_index("row_index", row_index, 1)
    _check_float("topk_weights", topk_weights, 2)
    _check_same_device(rows=rows, row_index=row_index, topk_weights=topk_weights)
    if topk_weights.shape[1] == 0:
        raise ValueError(f"topk_weights must have shape (T, K) with K >= 1, got {tuple(topk_weights.shape)}")
    if row_index.shape[0] > _MAX_SLOTS:
        raise ValueError(
            f"row_index has T*K = {row_index.shape[0]} entries, more than the 2**31 - 1 supported (slot indices are "
            "int32)"
        )
    if row_index.shape[0] != topk_weights.numel():
        raise ValueError(
            f"row_index must have T*K = {topk_weights.numel()} entries for topk_weights of shape "
            f"{tuple(topk_weights.shape)}, got {row_index.shape[0]}"
        )
    if resolve_backend("moe_unpermute", backend, rows.device) == "torch":
        return moe_unpermute_reference(rows, row_index, topk_weights)
    return _run_eagerly(_MoEUnpermute, rows, row_index.contiguous(), topk_weights, True)


@on_inputs_device
@casts_like_autocast("x", "w")
def grouped_mm(
    x: torch.Tensor, w: torch.Tensor, expert_offsets: torch.Tensor, *, backend: str = "auto"
) -> torch.Tensor:
    """out[rows of e] = x[rows of e] @ w[e]; differentiable wrt ``x`` and ``w``.

    x: (M, K) float; w: (E, K, N) in x's dtype (any strides: pass ``weight.transpose(1, 2)`` for ``(E, N, K)``
    linear weights); expert_offsets: (E,) int32 cumulative end rows. Returns (M, N). Rows at or past
    ``expert_offsets[-1]`` are zero on the torch path and undefined on the Triton path; ``x``'s gradient is zero
    there on both. Inside ``torch.autocast`` x and w are first cast to the autocast dtype (``casts_like_autocast``).
    """
    _check_float("x", x, 2)
    _check_float("w", w, 3)
    _check_offsets(expert_offsets, w.shape[0])
    _check_same_device(x=x, w=w, expert_offsets=expert_offsets)
    if w.dtype != x.dtype:
        raise ValueError(f"w must have x's dtype {x.dtype}, got {w.dtype}")
    if w.shape[0] == 0 or w.shape[1] != x.shape[1]:
        raise ValueError(
            f"w must have shape (E, K={x.shape[1]}, N) with E >= 1 to match x {tuple(x.shape)}, got {tuple(w.shape)}"
        )
    if _gemm_backend("grouped_mm", backend, x) == "torch":
        return grouped_mm_reference(x, w, expert_offsets)
    return _run_eagerly(_GroupedMM, x, w, expert_offsets.contiguous())


@on_inputs_device
@casts_like_autocast("rows", "gate_up_proj", "down_proj")
def expert_ffn(
    rows: torch.Tensor,
    expert_offsets: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """The expert FFN on rows grouped by expert: grouped gate/up GEMM -> SwiGLU -> grouped down GEMM.

    rows: (M, H); expert_offsets: (E,) int32 cumulative end rows; gate_up_proj: (E, 2I, H); down_proj: (E, H, I),
    all in rows' dtype. Returns (M, H); differentiable wrt rows and both weights. Rows at or past
    ``expert_offsets[-1]`` take no part: their output is zero on the torch path and undefined on the Triton path,
    their gradient zero on both. Inside ``torch.autocast`` rows and both weights are first cast to the autocast
    dtype (``casts_like_autocast``).
    """
    _check_float("rows", rows, 2)
    _check_expert_weights(gate_up_proj, down_proj, rows, "rows")
    _check_offsets(expert_offsets, gate_up_proj.shape[0])
    _check_same_device(rows=rows, expert_offsets=expert_offsets, gate_up_proj=gate_up_proj, down_proj=down_proj)
    if _gemm_backend("expert_ffn", backend, rows) == "torch":
        return expert_ffn_reference(rows, expert_offsets, gate_up_proj, down_proj)
    return _run_eagerly(_ExpertFFN, rows, expert_offsets.contiguous(), gate_up_proj, down_proj)


@on_inputs_device
@casts_like_autocast("hidden", "gate_up_proj", "down_proj")
def moe_ffn(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    *,
    first_expert: int | None = None,
    num_rows: int | None = None,
    check_ids: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """The routed expert FFN: permute -> expert_ffn -> unpermute (``moe_ffn_reference`` defines it).

    hidden: (T, H); topk_ids: (T, K) int32/int64; topk_weights: (T, K) float; gate_up_proj: (E, 2I, H);
    down_proj: (E, H, I). Returns (T, H) in hidden's dtype; differentiable wrt hidden, topk_weights and both
    weights. ``first_expert`` and ``num_rows``: as in ``moe_permute`` (the weights are then experts
    ``[first_expert, first_expert + E)``; slots routed elsewhere add nothing). With ``check_ids=False`` the
    Triton path makes no host sync (see the module docstring). Inside ``torch.autocast`` hidden and both weights are
    first cast to the autocast dtype (``casts_like_autocast``; topk_weights keep theirs).
    """
    _check_float("hidden", hidden, 2)
    _check_routing(topk_ids, hidden.shape[0])
    _check_float("topk_weights", topk_weights, 2)
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(
            f"topk_weights must have topk_ids' shape {tuple(topk_ids.shape)}, got {tuple(topk_weights.shape)}"
        )
    _check_expert_weights(gate_up_proj, down_proj, hidden, "hidden")
    _check_same_device(
        hidden=hidden, topk_ids=topk_ids, topk_weights=topk_weights, gate_up_proj=gate_up_proj, down_proj=down_proj
    )
    _check_count("first_expert", first_expert, 0, optional=True)
    _check_num_rows(num_rows)
    if check_ids and first_expert is None:
        _check_ids_in_range(topk_ids, gate_up_proj.shape[0])
    if _gemm_backend("moe_ffn", backend, hidden) == "torch":
        return moe_ffn_reference(hidden, topk_ids, topk_weights, gate_up_proj, down_proj, first_expert=first_expert)
    return _triton_moe_ffn(hidden, topk_ids, topk_weights, gate_up_proj, down_proj, first_expert, num_rows)
