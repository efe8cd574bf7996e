"""The models' linear projections: several of one input (q/k/v, gate/up) with one backward, casting their own weights.

``linear_group(x, linears)`` is ``tuple(linear(x) for linear in linears)``:

- **One backward for projections of one input.** With one ``nn.Linear`` each, autograd computes ``dy_i @ W_i`` per
  projection and adds the results with a separate elementwise kernel per extra projection (for the
  Llama-3.2-1B-shaped step: three (8192, 2048) bf16 adds per layer, 48 per step). Here the backward accumulates
  ``dx = dy_1 @ W_1``, then ``dx += dy_i @ W_i`` through ``addmm_`` (cuBLAS adds in its epilogue): no add kernel,
  no temporary per projection.
- **Weights cast inside, fp32 weight gradients from the GEMM.** While ``compute_dtype`` of the modules is set (the
  one-GPU mixed precision of ``veofast.distributed.mixed_precision`` sets it for the length of a unit's forward,
  instead of casting these parameters itself), fp32 weights are cast to it in the forward, and on CUDA the weight
  gradients come out of the GEMM in fp32 (``torch.mm(..., out_dtype=float32)``): no bf16 gradient that a cast kernel
  then converts (on an H200 a (8192, 2048) x (8192, 2048) weight-gradient GEMM took 0.350 ms with an fp32 output,
  0.343 ms in bf16 and 0.393 ms in bf16 followed by a cast), and the gradient keeps the GEMM's fp32 accumulation
  instead of a bf16 rounding. Elsewhere (CPU) the gradient is computed in the compute dtype and cast, bit for bit
  what a model held in that dtype computes.

``Linear`` is the ``nn.Linear`` the models build (same parameters, names and state dict; HF checkpoints load
unchanged); its forward is ``linear_group(x, [self])[0]``. Calling ``linear_group`` on modules skips their forward
hooks. Under ``torch.autocast`` it calls ``F.linear`` module by module (autocast decides the dtypes there).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Linear):
    """``nn.Linear`` that runs through ``linear_group``. ``compute_dtype``: None (compute in the parameters' dtype)
    or the dtype that its weights are cast to in the forward (set by mixed precision); ``casts_own_parameters``
    tells ``veofast.distributed.mixed_precision`` to leave this module's parameters to it."""

    casts_own_parameters = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.compute_dtype: torch.dtype | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_group(x, [self])[0]


def _weight_grad(grad: torch.Tensor, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``grad^T @ rows`` (out, in) in ``dtype``: straight out of the GEMM when it is fp32 on CUDA."""
    if grad.dtype == dtype:
        return grad.t().mm(rows)
    if grad.is_cuda and dtype == torch.float32:
        return torch.mm(grad.t(), rows, out_dtype=dtype)
    return grad.t().mm(rows).to(dtype)


class _LinearGroup(torch.autograd.Function):
    """``(rows, n, cast, W_1..W_n, b_1..b_n)`` -> ``(rows @ W_1^T + b_1, ..., rows @ W_n^T + b_n)``: rows (N, in),
    W_i (out_i, in), b_i (out_i,) or None, cast to rows' dtype when ``cast``; outputs (N, out_i); gradients in the
    parameters' own dtypes."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, n: int, cast: bool, *params: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        ctx.param_dtypes = [p.dtype if p is not None else None for p in params]
        if cast:
            params = [p if p is None or p.dtype == rows.dtype else p.to(rows.dtype) for p in params]
        weights, biases = params[:n], params[n:]
        ctx.save_for_backward(rows, *weights)
        return tuple(F.linear(rows, w, b) for w, b in zip(weights, biases))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        rows, *weights = ctx.saved_tensors
        n = len(weights)
        dx = None
        if ctx.needs_input_grad[0]:
            for g, w in zip(grads, weights):
                dx = torch.mm(g, w) if dx is None else dx.addmm_(g, w)
        needs = ctx.needs_input_grad[3:]
        dtypes = ctx.param_dtypes
        dweights = [_weight_grad(g, rows, dtypes[i]) if needs[i] else None for i, g in enumerate(grads)]
        dbiases = [g.sum(0).to(dtypes[n + i]) if needs[n + i] else None for i, g in enumerate(grads)]
        return dx, None, None, *dweights, *dbiases


def linear_group(x: torch.Tensor, linears: list[nn.Linear]) -> tuple[torch.Tensor, ...]:
    """``tuple(linear(x) for linear in linears)`` with the backward of ``_LinearGroup``.

    x: (..., in_features), shared by every module of ``linears`` (``nn.Linear``, same in_features). The compute
    dtype is the modules' ``compute_dtype`` when set (all the same), else x's dtype, which must then be the
    parameters' dtype as for ``nn.Linear``. Returns one (..., out_features_i) tensor per module.
    """
    if not linears:
        raise ValueError("linear_group: linears must name at least one nn.Linear")
    dtypes = {getattr(m, "compute_dtype", None) for m in linears}
    if len(dtypes) != 1:
        raise ValueError(f"linear_group: the modules have different compute dtypes {sorted(map(str, dtypes))}")
    compute_dtype = dtypes.pop()
    if torch.is_autocast_enabled(x.device.type):
        return tuple(F.linear(x, m.weight, m.bias) for m in linears)
    if compute_dtype is not None and x.dtype != compute_dtype:
        raise ValueError(f"linear_group: the input is {x.dtype}, the modules compute in {compute_dtype}")
    params = [m.weight for m in linears] + [m.bias for m in linears]
    outputs = _LinearGroup.apply(x.reshape(-1, x.shape[-1]), len(linears), compute_dtype is not None, *params)
    if x.dim() == 2:
        return outputs
    return tuple(y.view(*x.shape[:-1], y.shape[-1]) for y in outputs)
