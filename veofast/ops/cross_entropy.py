"""Fused linear cross-entropy: ``cross_entropy(hidden @ weight.T + bias, labels)`` without the full logits.

``fused_linear_cross_entropy`` is the public op (Triton on CUDA, the torch reference elsewhere);
``fused_linear_cross_entropy_reference`` is the plain-torch definition, chunked over tokens so it never holds all
``(N, V)`` logits either. Both compute the gradients chunk by chunk during the forward pass (the loss is the last op
of a training step) and scale them by the incoming gradient in the backward pass; ``reduction="none"`` instead
recomputes in the backward pass, with each token's incoming gradient as its weight.
"""

from __future__ import annotations

import torch

from ._backend import casts_like_autocast, on_inputs_device, resolve_backend, triton_or_fallback
from ._eager import first_order_only

OP = "fused_linear_cross_entropy"
REDUCTIONS = ("mean", "sum", "none")
LABEL_DTYPES = (torch.int64, torch.int32)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The reference holds (rows, V) fp32 logits per chunk, rows = max(1, REFERENCE_CHUNK_ELEMENTS // V).
REFERENCE_CHUNK_ELEMENTS = 2**24


def _reference_pass(
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
    row_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Plain-torch twin of ``veofast.kernels.cross_entropy.linear_cross_entropy_pass`` (same arguments, same results).

    hidden: (N, H); weight: (V, H); bias: (V,) or None; labels: (N,); token_scale: 0-dim or (N,) fp32;
    row_index: (K,) int64 rows to compute or None for all (the others get loss 0 and no gradient).
    Returns ce (N,) and z (N,) in fp32 (float64 for float64 inputs) and the gradients of
    ``sum_n token_scale[n] * (ce[n] + z[n])`` (or None).
    """
    if row_index is not None:  # the rows alone, spread back over N with zeros
        scale = token_scale.index_select(0, row_index) if token_scale.dim() else token_scale
        ce, z, g_hidden, g_weight, g_bias = _reference_pass(
            hidden.index_select(0, row_index),
            weight,
            bias,
            labels.index_select(0, row_index),
            scale,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            lse_square_scale=lse_square_scale,
            softcap=softcap,
            grad_hidden=grad_hidden,
            grad_weight=grad_weight,
            grad_bias=grad_bias,
        )

        def spread(part: torch.Tensor) -> torch.Tensor:
            return part.new_zeros((hidden.shape[0], *part.shape[1:])).index_copy_(0, row_index, part)

        return spread(ce), spread(z), None if g_hidden is None else spread(g_hidden), g_weight, g_bias
    vocab = weight.shape[0]
    compute_grad = grad_hidden or grad_weight or grad_bias
    acc = torch.promote_types(hidden.dtype, torch.float32)
    ce, z, g_hidden = [], [], []  # per chunk, concatenated at the end
    g_weight = torch.zeros_like(weight, dtype=acc) if grad_weight else None
    g_bias = hidden.new_zeros(vocab, dtype=acc) if grad_bias else None
    rows = max(1, REFERENCE_CHUNK_ELEMENTS // vocab)
    scales = token_scale.expand(hidden.shape[0]) if token_scale.dim() == 0 else token_scale
    # split, not a range over the token count: torch.compile then guards on the number of chunks (recompiling when
    # it changes) rather than on the token count (recompiling for every new batch length, even with dynamic=True)
    for h, y, scale in zip(hidden.split(rows), labels.split(rows), scales.split(rows), strict=True):
        logits = h @ weight.t()
        if bias is not None:
            logits = logits + bias
        logits = logits.to(acc)
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        lse = torch.logsumexp(logits, dim=-1)
        valid = y != ignore_index
        target = torch.where(valid, y, 0).long()
        target_logit = logits.gather(1, target[:, None])[:, 0]
        ce_chunk = lse - (1.0 - label_smoothing) * target_logit
        if label_smoothing:  # not 0 * mean: a -inf logit (a vocab entry masked by its bias) would make it NaN
            ce_chunk = ce_chunk - label_smoothing * logits.mean(dim=-1)
        ce.append(torch.where(valid, ce_chunk, 0.0))
        z.append(torch.where(valid, lse_square_scale * lse * lse, 0.0))
        if not compute_grad:
            continue
        dlogits = torch.exp(logits - lse[:, None]) * (1.0 + 2.0 * lse_square_scale * lse)[:, None]
        dlogits = dlogits - label_smoothing / vocab
        dlogits[torch.arange(h.shape[0], device=h.device), target] -= 1.0 - label_smoothing
        if softcap is not None:
            dlogits = dlogits * (1.0 - (logits / softcap) ** 2)
        dlogits = (dlogits * torch.where(valid, scale, 0.0)[:, None]).to(hidden.dtype)
        if grad_hidden:
            g_hidden.append(dlogits @ weight)
        if g_weight is not None:
            g_weight += (dlogits.t() @ h).to(acc)
        if g_bias is not None:
            g_bias += dlogits.to(acc).sum(0)
    if g_weight is not None:
        g_weight = g_weight.to(weight.dtype)
    if g_bias is not None and bias is not None:
        g_bias = g_bias.to(bias.dtype)
    return torch.cat(ce), torch.cat(z), torch.cat(g_hidden) if grad_hidden else None, g_weight, g_bias


# An explicit schema, so that the op does not depend on how a torch version infers one from annotations.
_PASS_SCHEMA = (
    "(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, Tensor token_scale, int ignore_index, "
    "float label_smoothing, float lse_square_scale, float? softcap, bool grad_hidden, bool grad_weight, "
    "bool grad_bias, Tensor? row_index) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)


@torch.library.custom_op("veofast::linear_cross_entropy_pass", mutates_args=(), schema=_PASS_SCHEMA)
def _triton_pass_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    token_scale: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    lse_square_scale: float,
    softcap: float | None,
    grad_hidden: bool,
    grad_weight: bool,
    grad_bias: bool,
    row_index: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Triton pass as an opaque op (so ``torch.compile`` does not trace the launcher); grads that were not
    asked for come back as empty (0,) tensors."""
    from veofast.kernels.cross_entropy import linear_cross_entropy_pass

    ce, z, *grads = linear_cross_entropy_pass(
        hidden,
        weight,
        bias,
        labels,
        token_scale,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        lse_square_scale=lse_square_scale,
        softcap=softcap,
        grad_hidden=grad_hidden,
        grad_weight=grad_weight,
        grad_bias=grad_bias,
        row_index=row_index,
    )
    return (ce, z, *(hidden.new_empty(0) if g is None else g for g in grads))


@_triton_pass_op.register_fake
def _(
    hidden,
    weight,
    bias,
    labels,
    token_scale,
    ignore_index,
    label_smoothing,
    lse_square_scale,
    softcap,
    grad_hidden,
    grad_weight,
    grad_bias,
    row_index,
):
    ce = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
    g_bias = bias.new_empty(bias.shape) if grad_bias and bias is not None else hidden.new_empty(0)
    return (
        ce,
        torch.empty_like(ce),
        hidden.new_empty(hidden.shape) if grad_hidden else hidden.new_empty(0),
        weight.new_empty(weight.shape) if grad_weight else hidden.new_empty(0),
        g_bias,
    )


@torch.library.custom_op("veofast::scale_unless_one_", mutates_args=("t",), schema="(Tensor(a!) t, Tensor scale) -> ()")
def _scale_unless_one_op(t: torch.Tensor, scale: torch.Tensor) -> None:
    """``t *= scale`` that reads and writes nothing when scale == 1 (the incoming gradient of a training loss)."""
    from veofast.kernels.cross_entropy import scale_unless_one_

    scale_unless_one_(t, scale)


@_scale_unless_one_op.register_fake
def _(t, scale):
    return None


def _run_pass(
    backend: str, hidden, weight, bias, labels, token_scale, row_index, options: tuple, needs: tuple[bool, bool, bool]
):
    """Dispatch one pass to the Triton op or the torch reference; returns ce, z, grad_hidden, grad_weight, grad_bias.

    row_index: the rows to compute, or None for all; options: (ignore_index, label_smoothing, lse_square_scale,
    softcap); needs: which grads to compute.
    """
    ignore_index, label_smoothing, lse_square_scale, softcap = options
    wanted = (needs[0], needs[1], needs[2] and bias is not None)
    kwargs = dict(
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        lse_square_scale=lse_square_scale,
        softcap=softcap,
        grad_hidden=wanted[0],
        grad_weight=wanted[1],
        grad_bias=wanted[2],
        row_index=row_index,
    )
    if backend == "torch":
        return _reference_pass(hidden, weight, bias, labels, token_scale, **kwargs)
    ce, z, *grads = _triton_pass_op(hidden, weight, bias, labels, token_scale, **kwargs)
    return (ce, z, *(g if w else None for g, w in zip(grads, wanted, strict=True)))


def _scale_saved_grads_once(ctx, grad_loss: torch.Tensor) -> tuple:
    """The Triton path's backward for "mean"/"sum": scale the gradients saved by the forward pass in place (no copy
    of the (N, H) and (V, H) gradients; nothing is read or written when grad_loss is 1). They are then spent, so a
    second backward through the same graph raises."""
    if ctx.grads_spent:
        raise RuntimeError(
            f"{OP}: the Triton path with reduction='mean'/'sum' runs one backward per forward (its gradients are made "
            "in the forward pass and scaled in place); for retain_graph=True and several backward passes use "
            "reduction='none' and reduce the per-token loss yourself"
        )
    ctx.grads_spent = True
    grads = ctx.saved_tensors
    for g in grads:
        if g is not None:
            _scale_unless_one_op(g, grad_loss.float())
    return grads


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Outputs (loss, z_loss_term). For "mean"/"sum" the gradients are made in forward and scaled in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, token_scale, row_index, reduction, options, backend, grad_enabled):
        needs = ctx.needs_input_grad[:3]
        precompute = reduction != "none" and grad_enabled
        ce, z, *grads = _run_pass(
            backend,
            hidden,
            weight,
            bias,
            labels,
            token_scale,
            row_index,
            options,
            needs if precompute else (False, False, False),
        )
        ctx.reduction, ctx.options, ctx.backend = reduction, options, backend
        ctx.grads_spent = False
        if reduction == "none":
            ctx.save_for_backward(hidden, weight, bias, labels, row_index)
            loss, z_term = ce + z, z
        else:
            ctx.save_for_backward(*grads)
            loss, z_term = (ce.sum() + z.sum()) * token_scale, z.sum() * token_scale
        ctx.mark_non_differentiable(z_term)
        return loss, z_term

    @staticmethod
    @first_order_only(OP)
    def backward(ctx, grad_loss, grad_z):
        if ctx.reduction == "none":
            hidden, weight, bias, labels, row_index = ctx.saved_tensors
            scale = grad_loss.to(torch.promote_types(grad_loss.dtype, torch.float32)).contiguous()
            _, _, *grads = _run_pass(
                ctx.backend, hidden, weight, bias, labels, scale, row_index, ctx.options, ctx.needs_input_grad[:3]
            )
        elif ctx.backend == "torch":
            grads = [None if g is None else g * grad_loss for g in ctx.saved_tensors]
        else:
            grads = _scale_saved_grads_once(ctx, grad_loss)
        return (*grads, None, None, None, None, None, None, None)


def _check_inputs(
    hidden, weight, labels, bias, reduction, num_items_in_batch, label_smoothing, lse_square_scale, softcap
) -> None:
    """Raise ValueError naming the bad argument."""
    for name, t in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{OP}: {name} must be a tensor, got {type(t).__name__}")
    if hidden.dim() < 2 or not hidden.is_floating_point():
        raise ValueError(f"{OP}: hidden must be a floating tensor of shape (..., H), got {hidden.dtype} {hidden.shape}")
    if weight.dim() != 2 or weight.shape[0] == 0 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{OP}: weight must have shape (V, {hidden.shape[-1]}) with V >= 1 to match hidden, got {weight.shape}"
        )
    if weight.dtype != hidden.dtype:
        raise ValueError(f"{OP}: weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    if labels.dtype not in LABEL_DTYPES:
        raise ValueError(f"{OP}: labels must be int64 or int32, got {labels.dtype}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"{OP}: labels must have shape {tuple(hidden.shape[:-1])} (hidden without H), got {tuple(labels.shape)}"
        )
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (weight.shape[0],) or bias.dtype != weight.dtype:
            raise ValueError(f"{OP}: bias must be a ({weight.shape[0]},) tensor of dtype {weight.dtype}")
    tensors = {"hidden": hidden, "weight": weight, "labels": labels, "bias": bias}
    for name, t in tensors.items():
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{OP}: {name} is on {t.device} but hidden is on {hidden.device}; put them on one device")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{OP}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if num_items_in_batch is not None:
        if reduction != "mean":
            raise ValueError(f"{OP}: num_items_in_batch only applies to reduction='mean', got {reduction!r}")
        if isinstance(num_items_in_batch, torch.Tensor):
            if num_items_in_batch.numel() != 1:
                raise ValueError(f"{OP}: num_items_in_batch must be an int or a 1-element tensor")
        elif isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, int) or num_items_in_batch < 0:
            raise ValueError(f"{OP}: num_items_in_batch must be a non-negative int, got {num_items_in_batch!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{OP}: label_smoothing must be in [0, 1], got {label_smoothing}")
    if not lse_square_scale >= 0.0:
        raise ValueError(f"{OP}: lse_square_scale must be >= 0, got {lse_square_scale}")
    if softcap is not None and not softcap > 0.0:
        raise ValueError(f"{OP}: softcap must be None or > 0, got {softcap}")


def _check_label_range(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Torch path only (it reads two values on the host): raise ValueError for a label outside [0, V)."""
    if labels.numel() == 0:
        return
    kept = torch.where(labels == ignore_index, 0, labels)
    low, high = int(kept.min()), int(kept.max())
    if low < 0 or high >= vocab:
        raise ValueError(
            f"{OP}: labels must be in [0, {vocab}) or equal ignore_index={ignore_index}; "
            f"found values in [{low}, {high}]"
        )


def _label_rows(labels: torch.Tensor, ignore_index: int, count: int) -> torch.Tensor | None:
    """(count,) int64 positions of the labels that are not ``ignore_index`` (None when that is all of them), found
    without a host sync; ``count`` is checked against them at once on a CPU, by a device-side assertion elsewhere."""
    kept = labels != ignore_index
    message = (
        f"{OP}: num_label_tokens={count} but the labels hold a different number of values other than "
        f"ignore_index={ignore_index}"
    )
    if labels.device.type == "cpu" and not torch.compiler.is_compiling():
        actual = int(kept.sum())
        if actual != count:
            raise ValueError(f"{message} ({actual})")
    else:
        torch._assert_async(kept.sum() == count, message)
    if count == labels.numel():
        return None
    return torch.nonzero_static(kept, size=count).squeeze(1)


@on_inputs_device
@casts_like_autocast("hidden", "weight", "bias")
def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    lse_square_scale: float = 0.0,
    softcap: float | None = None,
    return_z_loss: bool = False,
    num_label_tokens: int | None = None,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of ``logits = hidden @ weight.T (+ bias)`` against ``labels``, never materialising all logits.

    hidden: (..., H) float (bf16/fp16/fp32; math in fp32); weight: (V, H) same dtype; labels: hidden's shape without
    H, int64 or int32; bias: (V,) or None. Inside ``torch.autocast`` hidden, weight and bias are first cast to the
    autocast dtype, as ``F.linear``'s inputs are, and the op runs as it would on those (``casts_like_autocast``).

    - ``softcap``: logits become ``softcap * tanh(logits / softcap)`` before the softmax.
    - ``label_smoothing``: as in ``torch.nn.functional.cross_entropy``.
    - ``lse_square_scale``: adds the z-loss ``lse_square_scale * logsumexp(logits)**2`` per token.
    - ``reduction``: "mean" divides the sum over non-ignored tokens by their count (a device tensor, no sync), or by
      ``num_items_in_batch`` (int or 1-element tensor, best on hidden's device: it is copied there) when given; a
      count of 0 counts as 1 (the sum is then 0). "sum" sums; "none" returns the per-token loss, shape
      ``hidden.shape[:-1]``, 0 where ignored.
    - ``return_z_loss``: also return the z-loss term (reduced like the loss, already included in it, detached).
    - ``num_label_tokens``: how many labels are not ``ignore_index``, when the caller knows it on the host (the
      collators count them): the tokens with an ignored label are then left out of the matmuls, without a host
      sync (their share of the work is saved; results are unchanged). A wrong count raises ValueError on a CPU and
      fails a device-side assertion on an accelerator.

    Returns the loss in fp32 (float64 for float64 inputs on the torch backend; 0-dim, or per token for "none"), and
    the z-loss term when ``return_z_loss``. The gradients are made in the forward pass for "mean"/"sum", so a
    second-order gradient raises, and so does a second backward through one graph on the Triton backend.
    Labels outside [0, V) other than ``ignore_index`` raise ValueError on the torch backend (not checked under
    ``torch.compile``); the Triton backend does not check them (that would need a host-device sync) and treats them
    as ignored, in the loss and in the count.
    ``backend``: "auto" (Triton on CUDA, torch elsewhere; float64 goes to the torch backend, logged once),
    "triton" or "torch".
    Raises ValueError naming the argument, before any kernel runs, for shapes (V >= 1), dtypes or devices other than
    these and for out-of-range options (reduction, num_items_in_batch, label_smoothing in [0, 1], lse_square_scale
    >= 0, softcap > 0, num_label_tokens).
    """
    _check_inputs(
        hidden, weight, labels, bias, reduction, num_items_in_batch, label_smoothing, lse_square_scale, softcap
    )
    if num_label_tokens is not None and (
        isinstance(num_label_tokens, bool)
        or not isinstance(num_label_tokens, int)
        or not 0 <= num_label_tokens <= labels.numel()
    ):
        raise ValueError(
            f"{OP}: num_label_tokens must be None or an int in [0, {labels.numel()}] (labels.numel()), "
            f"got {num_label_tokens!r}"
        )
    chosen = resolve_backend(OP, backend, hidden.device)
    if chosen == "triton" and hidden.dtype not in TRITON_DTYPES:
        reason = f"the triton backend takes hidden and weight in {TRITON_DTYPES}, got {hidden.dtype}"
        chosen = triton_or_fallback(OP, backend, reason)
    vocab = weight.shape[0]
    hidden2d = hidden.reshape(labels.numel(), hidden.shape[-1])  # not -1: H may be 0
    labels1d = labels.reshape(-1).contiguous()
    if chosen == "torch" and not torch.compiler.is_compiling():
        _check_label_range(labels1d, vocab, ignore_index)
    scale_dtype = torch.promote_types(hidden.dtype, torch.float32)  # float64 inputs: the count in float64 too
    if reduction == "mean":
        if num_items_in_batch is None:
            valid = (labels1d != ignore_index) & (labels1d >= 0) & (labels1d < vocab)
            count = valid.sum(dtype=scale_dtype)
        elif isinstance(num_items_in_batch, torch.Tensor):
            count = num_items_in_batch.reshape(()).to(device=hidden.device, dtype=scale_dtype)
        else:
            count = torch.full((), float(num_items_in_batch), dtype=scale_dtype, device=hidden.device)
        token_scale = 1.0 / count.clamp(min=1.0)
    else:
        token_scale = torch.ones((), dtype=scale_dtype, device=hidden.device)
    options = (
        int(ignore_index),
        float(label_smoothing),
        float(lse_square_scale),
        None if softcap is None else float(softcap),
    )
    row_index = None
    if num_label_tokens is not None:
        row_index = _label_rows(labels1d, ignore_index, num_label_tokens)
    loss, z_term = _FusedLinearCrossEntropy.apply(
        hidden2d, weight, bias, labels1d, token_scale, row_index, reduction, options, chosen, torch.is_grad_enabled()
    )
    if reduction == "none":
        loss, z_term = loss.reshape(labels.shape), z_term.reshape(labels.shape)
    return (loss, z_term) if return_z_loss else loss


def fused_linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    lse_square_scale: float = 0.0,
    softcap: float | None = None,
    return_z_loss: bool = False,
    num_label_tokens: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The plain-torch definition of ``fused_linear_cross_entropy`` (same arguments and results), chunked over
    tokens; it is the CPU backend. Raises ValueError for labels outside [0, V) other than ``ignore_index``."""
    return fused_linear_cross_entropy(
        hidden,
        weight,
        labels,
        bias=bias,
        ignore_index=ignore_index,
        reduction=reduction,
        num_items_in_batch=num_items_in_batch,
        label_smoothing=label_smoothing,
        lse_square_scale=lse_square_scale,
        softcap=softcap,
        return_z_loss=return_z_loss,
        num_label_tokens=num_label_tokens,
        backend="torch",
    )
