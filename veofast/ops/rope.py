"""Rotary position embedding of q and k from packed ``position_ids``: the reference, the Triton path and dispatch.

Convention: HF's non-interleaved ``rotate_half``. With ``freqs = position * inv_freq`` (fp32),
``emb = cat(freqs, freqs)``, ``cos = cos(emb) * scaling`` and ``sin = sin(emb) * scaling``:
``out = x * cos + rotate_half(x) * sin`` where ``rotate_half(x) = cat(-x[D/2:], x[:D/2])``.
``position_ids`` may restart at 0 per packed document or be in any order; every token is rotated by its own
position.

The Triton kernel computes cos/sin in registers in fp32 and rounds the rotated value once; HF (and the reference)
round cos/sin to the input dtype and do the multiply-adds in it, so in bf16 the two differ by about one bf16
rounding. By default the kernel writes fresh outputs; ``inplace=True`` rotates q and k in their own storage (what
the models do: their q and k are projection outputs that nothing else reads), in one launch: it saves the outputs'
memory, and the data it rewrites is still in L2 (H200, T=8192, 32/8 heads, d=64: 3.90 TB/s in place, 3.27 out of
place). The backward needs neither q nor k, so both forms are differentiable.
"""

import math

import torch

from veofast.ops._backend import on_inputs_device, resolve_backend, triton_or_fallback
from veofast.ops._eager import direct, with_autograd

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_POSITION_DTYPES = (torch.int32, torch.int64)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    position_ids: torch.Tensor,
    inv_freq: torch.Tensor,
    *,
    scaling: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch RoPE exactly as HF computes it (the CPU path and the test oracle).

    q: (T, Hq, D); k: (T, Hk, D); position_ids: (T,) int; inv_freq: (D/2,) fp32. Angles are fp32 products; cos/sin
    are taken in fp32 (float64 for float64 inputs) and cast to q's dtype. Returns (q_out, k_out) shaped like q, k.
    """
    freqs = position_ids.float()[:, None] * inv_freq.float()[None, :]
    emb = torch.cat((freqs, freqs), dim=-1).to(torch.promote_types(q.dtype, torch.float32))
    cos = (emb.cos() * scaling).to(q.dtype)[:, None, :]
    sin = (emb.sin() * scaling).to(q.dtype)[:, None, :]
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _check(q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor, scaling) -> None:
    if q.dim() != 3 or not q.is_floating_point():
        raise ValueError(f"apply_rotary: q must be a floating tensor (T, Hq, D), got {q.dtype} {tuple(q.shape)}")
    n_tokens, _, head_dim = q.shape
    if k.dim() != 3 or k.shape[0] != n_tokens or k.shape[2] != head_dim:
        raise ValueError(f"apply_rotary: k must have shape ({n_tokens}, Hk, {head_dim}), got {tuple(k.shape)}")
    if k.dtype != q.dtype or k.device != q.device:
        raise ValueError(
            f"apply_rotary: k must match q's dtype and device ({q.dtype}, {q.device}), got ({k.dtype}, {k.device})"
        )
    if head_dim < 2 or head_dim % 2:
        raise ValueError(f"apply_rotary: head_dim (q.shape[-1]) must be even and >= 2, got {head_dim}")
    if position_ids.shape != (n_tokens,) or position_ids.dtype not in _POSITION_DTYPES:
        raise ValueError(
            f"apply_rotary: position_ids must be an int32/int64 tensor of shape ({n_tokens},), "
            f"got {position_ids.dtype} {tuple(position_ids.shape)}"
        )
    if inv_freq.shape != (head_dim // 2,) or inv_freq.dtype != torch.float32:
        raise ValueError(
            f"apply_rotary: inv_freq must be a float32 tensor of shape ({head_dim // 2},) (keep the buffer in fp32 "
            f"when the model is cast), got {inv_freq.dtype} {tuple(inv_freq.shape)}"
        )
    if position_ids.device != q.device or inv_freq.device != q.device:
        raise ValueError(
            f"apply_rotary: position_ids ({position_ids.device}) and inv_freq ({inv_freq.device}) must be on "
            f"q's device ({q.device})"
        )
    # a comparison rather than math.isfinite, which torch.compile cannot trace for a symbolic float
    if isinstance(scaling, bool) or not isinstance(scaling, int | float) or not -math.inf < scaling < math.inf:
        raise ValueError(f"apply_rotary: scaling must be a float and finite, got {scaling!r}")


def _check_inplace(q: torch.Tensor, k: torch.Tensor) -> None:
    """For ``inplace=True``, before anything is written: two tensors, none of whose elements share memory, that
    autograd lets us modify in place."""
    if q is k:
        raise ValueError("apply_rotary: with inplace=True, q and k must be different tensors (it would rotate twice)")
    for name, t in (("q", q), ("k", k)):
        if t.is_leaf and t.requires_grad and torch.is_grad_enabled():
            raise ValueError(
                f"apply_rotary: with inplace=True, {name} must not be a leaf that requires grad (autograd forbids "
                "modifying it in place); pass inplace=False, or a tensor computed from it"
            )
        if any(size > 1 and stride == 0 for size, stride in zip(t.shape, t.stride(), strict=True)):
            raise ValueError(
                f"apply_rotary: with inplace=True, {name} must not be expanded (several of its elements share memory, "
                f"strides {t.stride()}); pass inplace=False or a clone"
            )


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _rotary_impl(
    q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor, scaling: float, inverse: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    from veofast.kernels.rope import rotary

    return rotary(_unit_stride(q), _unit_stride(k), position_ids.contiguous(), inv_freq.contiguous(), scaling, inverse)


_rotary_op = torch.library.custom_op("veofast::rotary", _rotary_impl, mutates_args=())


@_rotary_op.register_fake
def _(q, k, position_ids, inv_freq, scaling, inverse):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _setup_rotary(ctx, inputs, output):
    _, _, position_ids, inv_freq, scaling, inverse = inputs
    ctx.save_for_backward(position_ids, inv_freq)
    ctx.scaling, ctx.inverse = scaling, inverse


def _backward_rotary(ctx, dq, dk):
    position_ids, inv_freq = ctx.saved_tensors
    dq, dk = _rotary(dq, dk, position_ids, inv_freq, ctx.scaling, not ctx.inverse)
    return dq, dk, None, None, None, None


_rotary = with_autograd(_rotary_op, _rotary_impl, _backward_rotary, _setup_rotary, differentiable_backward=True)


def _rotary_inplace_impl(
    q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor, scaling: float
) -> None:
    from veofast.kernels.rope import rotary

    position_ids, inv_freq = position_ids.contiguous(), inv_freq.contiguous()
    if q.stride(-1) == 1 and k.stride(-1) == 1:
        rotary(q, k, position_ids, inv_freq, scaling, False, inplace=True)
    else:  # the kernel needs unit stride along head_dim: rotate copies, then write them back
        q_out, k_out = rotary(q.contiguous(), k.contiguous(), position_ids, inv_freq, scaling, False)
        q.copy_(q_out)
        k.copy_(k_out)


_rotary_inplace = direct(
    torch.library.custom_op("veofast::rotary_", _rotary_inplace_impl, mutates_args=("q", "k")), _rotary_inplace_impl
)


def _inverse_rotation(ctx, dx: torch.Tensor) -> tuple:
    """The gradient of an in-place rotation: the out-of-place inverse rotation of ``dx`` (alone: no k heads)."""
    position_ids, inv_freq = ctx.saved_tensors
    dx, _ = _rotary(dx, dx[:, :0], position_ids, inv_freq, ctx.scaling, True)
    return dx, None, None, None, None


class _RotateQAndK(torch.autograd.Function):
    """Rotates q and k in place in one launch and returns q. Autograd allows a Function that modifies a view (the
    models' ``proj(x).view(T, heads, d)``) in place only with a single output, so k is handed to ``_RotatedK``
    right after, which marks it modified and owns its gradient."""

    @staticmethod
    def forward(ctx, q, k, position_ids, inv_freq, scaling):
        _rotary_inplace(q, k, position_ids, inv_freq, scaling)
        ctx.mark_dirty(q)
        ctx.save_for_backward(position_ids, inv_freq)
        ctx.scaling = scaling
        return q

    backward = staticmethod(_inverse_rotation)


class _RotatedK(torch.autograd.Function):
    """k, already rotated in place by ``_RotateQAndK``: marks it modified; its backward is the inverse rotation."""

    @staticmethod
    def forward(ctx, k, position_ids, inv_freq, scaling, _q):
        ctx.mark_dirty(k)
        ctx.save_for_backward(position_ids, inv_freq)
        ctx.scaling = scaling
        return k

    backward = staticmethod(_inverse_rotation)


@on_inputs_device
def apply_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    position_ids: torch.Tensor,
    inv_freq: torch.Tensor,
    *,
    scaling: float = 1.0,
    inplace: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k by their tokens' positions; differentiable in q and k.

    q: (T, Hq, D), k: (T, Hk, D) (Hq may differ from Hk; any strides); position_ids: (T,) int32/int64, e.g. packed
    documents restarting at 0; inv_freq: (D/2,) fp32; scaling multiplies cos and sin (HF's ``attention_scaling``).
    Returns (q_out, k_out) shaped like q and k: new tensors, or with ``inplace=True`` q and k themselves, rotated
    in place (autograd then treats it like any in-place op: q and k must not be leaves that require grad, nor
    tensors that an earlier op saved for its backward). ``backend``: ``"auto"`` (Triton on CUDA; float64 goes to
    the reference, logged once), ``"triton"`` or ``"torch"``.
    Raises ValueError, before anything is computed or written, for shapes, dtypes or devices other than these (D
    even), a non-finite scaling, and with ``inplace=True`` for q and k being one tensor or a leaf that requires grad
    (in grad mode) or expanded; with ``backend="triton"`` also for float64.
    """
    _check(q, k, position_ids, inv_freq, scaling)
    if not isinstance(inplace, bool):
        raise ValueError(f"apply_rotary: inplace must be a bool, got {inplace!r}")
    if inplace:
        _check_inplace(q, k)
    chosen = resolve_backend("apply_rotary", backend, q.device)
    if chosen == "triton" and q.dtype not in _TRITON_DTYPES:
        reason = f"the triton backend takes q and k in {_TRITON_DTYPES}, got {q.dtype}"
        chosen = triton_or_fallback("apply_rotary", backend, reason)
    if chosen == "torch":
        q_out, k_out = apply_rotary_reference(q, k, position_ids, inv_freq, scaling=scaling)
        return (q.copy_(q_out), k.copy_(k_out)) if inplace else (q_out, k_out)
    if inplace:
        scaling = float(scaling)
        _RotatedK.apply(k, position_ids, inv_freq, scaling, _RotateQAndK.apply(q, k, position_ids, inv_freq, scaling))
        return q, k  # not the Functions' outputs: under no_grad, those are aliases of q and k that require no grad
    return _rotary(q, k, position_ids, inv_freq, float(scaling), False)
