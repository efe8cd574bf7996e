"""Several linear projections of one input (q/k/v, gate/up) whose backward sums the input gradient in the GEMMs.

With one ``nn.Linear`` per projection, autograd computes ``dy_i @ W_i`` for each and adds the results with a
separate elementwise kernel per extra projection (for the Llama-3.2-1B-shaped step: three (8192, 2048) bf16 adds per
layer, 48 per step). ``linear_group`` runs the same GEMMs forward and in its backward accumulates
``dx = dy_1 @ W_1``, then ``dx += dy_i @ W_i`` through ``addmm_`` (cuBLAS adds into its output in the epilogue), so
no add kernel runs and no temporary per projection is allocated. Parameters stay separate ``nn.Linear`` modules, so
names, state dicts, FSDP units and HF checkpoints are unchanged; the modules' forward hooks are not called.

Under ``torch.autocast`` it calls the modules' ``F.linear`` one by one (autocast decides the dtypes there).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _LinearGroup(torch.autograd.Function):
    """``(rows, n, W_1..W_n, b_1..b_n)`` -> ``(rows @ W_1^T + b_1, ..., rows @ W_n^T + b_n)``: rows (N, in), W_i
    (out_i, in), b_i (out_i,) or None; outputs (N, out_i)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, n: int, *params: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        weights, biases = params[:n], params[n:]
        ctx.save_for_backward(rows, *weights)
        ctx.has_bias = tuple(b is not None for b in biases)
        return tuple(F.linear(rows, w, b) for w, b in zip(weights, biases))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        rows, *weights = ctx.saved_tensors
        n = len(weights)
        dx = None
        if ctx.needs_input_grad[0]:
            for g, w in zip(grads, weights):
                dx = torch.mm(g, w) if dx is None else dx.addmm_(g, w)
        dweights = [g.t().mm(rows) if ctx.needs_input_grad[2 + i] else None for i, g in enumerate(grads)]
        dbiases = [
            g.sum(0) if has and ctx.needs_input_grad[2 + n + i] else None
            for i, (g, has) in enumerate(zip(grads, ctx.has_bias))
        ]
        return dx, None, *dweights, *dbiases


def linear_group(x: torch.Tensor, linears: list[torch.nn.Linear]) -> tuple[torch.Tensor, ...]:
    """``tuple(linear(x) for linear in linears)``, with the backward of ``_LinearGroup``.

    x: (..., in_features), shared by every module of ``linears`` (``nn.Linear``, same in_features, same dtype as
    x). Returns one (..., out_features_i) tensor per module.
    """
    if not linears:
        raise ValueError("linear_group: linears must name at least one nn.Linear")
    if torch.is_autocast_enabled(x.device.type):
        return tuple(F.linear(x, m.weight, m.bias) for m in linears)
    params = [m.weight for m in linears] + [m.bias for m in linears]
    outputs = _LinearGroup.apply(x.reshape(-1, x.shape[-1]), len(linears), *params)
    if x.dim() == 2:
        return outputs
    return tuple(y.view(*x.shape[:-1], y.shape[-1]) for y in outputs)
