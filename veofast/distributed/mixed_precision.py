"""Mixed precision without FSDP: fp32 master weights, bf16 compute, fp32 gradients, by casting per unit.

On a one-rank mesh FSDP2's mixed precision moves each parameter through copies that do nothing: its fp32 shard
is cast into an all-gather buffer, copied by a one-rank all-gather, copied out to the unsharded bf16 parameter;
its bf16 gradient is cast into an fp32 reduce-scatter buffer and copied by a one-rank reduce-scatter into the
sharded gradient. That is 28 bytes of memory traffic per parameter and step, where the two casts need 12.

``cast_parameters_for_compute`` keeps the numerics of ``MixedPrecisionPolicy(param_dtype=bf16,
reduce_dtype=fp32)`` with only the casts. Units are the modules FSDP would wrap (decoder layers) plus the root
for every parameter outside them. A forward pre-hook on a unit replaces the unit's own parameters by their bf16
casts for the length of the unit's forward, and a forward hook (also run when the forward raises) puts the fp32
parameters back. Each cast is ``Tensor.to`` forward; its backward casts the bf16 gradient back to fp32 (on CUDA
with a Triton kernel, ``kernels/cast.py``: twice as fast as torch's copy there) and autograd accumulates it into
the fp32 parameter's ``.grad``. Activation checkpointing recomputes a layer through its ``__call__``, so
the hooks cast again then, as FSDP re-gathers a resharded unit. Outside a forward the model holds its fp32
parameters: state dicts, checkpoints, the optimizer and gradient clipping see nothing different.

A parameter used by several modules of one unit (tied embedding and LM head) is cast once per forward. Modules
that cast their own parameters (``casts_own_parameters``: the models' ``veofast.models.linear_group.Linear``) are
left their fp32 parameters and get the dtype as ``compute_dtype`` for the length of the unit's forward; their
backward returns fp32 weight gradients straight from the GEMM, without the bf16 gradient and its cast.

Tried and not kept: bf16 copies that the optimizer writes in its update pass (2 bytes per parameter instead of the
cast's 6) and the forward uses instead of casting. On an H200 the step time did not change beyond its noise
(Llama-3.2-1B-shaped: 161.8 vs 161.1 ms, alternating steps; 4-layer Qwen3-30B-A3B-shaped: 100.3 / 100.9 vs
101.1 / 100.0 ms) and the copies kept between steps raised the MoE model's peak from 47.1 to 52.9 GiB.
"""

from __future__ import annotations

import torch
from torch import nn

_KERNEL_MIN_NUMEL = 1 << 20  # smaller gradients (norm weights) cost more to launch a kernel for than to copy


def _to_dtype(grad: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``grad.to(dtype)``; on CUDA, for large contiguous gradients, with the Triton cast kernel."""
    if grad.is_cuda and grad.is_contiguous() and grad.numel() >= _KERNEL_MIN_NUMEL:
        from veofast.kernels.cast import cast_contiguous

        return cast_contiguous(grad, dtype)
    return grad.to(dtype)


class _CastForCompute(torch.autograd.Function):
    """``tuple(param.to(dtype) for param in params)`` as one autograd node (one ``apply`` per unit and forward
    instead of one per parameter: on the dense 1B step that is 17 instead of 146 calls, each some 15 us of host
    time in a forward that the host barely issues faster than the GPU runs it). The backward returns each
    gradient in its parameter's dtype, None for a cast that took no part in the loss."""

    @staticmethod
    def forward(ctx, dtype: torch.dtype, *params: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.set_materialize_grads(False)
        ctx.param_dtypes = [p.dtype for p in params]
        return tuple(p.to(dtype) for p in params)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None):
        return None, *(g if g is None else _to_dtype(g, dt) for g, dt in zip(grads, ctx.param_dtypes, strict=True))


class _UnitCast:
    """The hooks of one unit: ``slots`` are ``(module, name)`` of the parameters the unit casts; ``self_casting``
    the unit's modules that cast their own parameters (``casts_own_parameters``), told the dtype through their
    ``compute_dtype`` for the length of the unit's forward."""

    def __init__(self, slots: list[tuple[nn.Module, str]], self_casting: list[nn.Module], dtype: torch.dtype):
        self.slots = slots
        self.self_casting = self_casting
        self.dtype = dtype
        self.saved: list[list[torch.Tensor]] = []  # a stack: one entry per forward in progress

    def cast(self, module: nn.Module, args) -> None:
        for m in self.self_casting:
            m.compute_dtype = self.dtype
        originals = [owner._parameters[name] for owner, name in self.slots]
        to_cast = {id(p): p for p in originals if p.dtype != self.dtype}  # a shared parameter once
        trained = [p for p in to_cast.values() if p.requires_grad]
        casts = {key: p.to(self.dtype) for key, p in to_cast.items() if not p.requires_grad}
        if trained:
            casts.update(zip(map(id, trained), _CastForCompute.apply(self.dtype, *trained)))
        for (owner, name), param in zip(self.slots, originals, strict=True):
            owner._parameters[name] = casts.get(id(param), param)
        self.saved.append(originals)

    def restore(self, module: nn.Module, args, output) -> None:
        for (owner, name), param in zip(self.slots, self.saved.pop(), strict=True):
            owner._parameters[name] = param
        if not self.saved:
            for m in self.self_casting:
                m.compute_dtype = None


def _owned_modules(unit: nn.Module, units: set[int]) -> list[nn.Module]:
    """``unit`` and the modules under it that are not inside a nested unit."""
    modules = []
    stack = [unit]
    while stack:
        module = stack.pop()
        modules.append(module)
        stack.extend(child for child in module.children() if id(child) not in units)
    return modules


def cast_parameters_for_compute(model: nn.Module, units: list[nn.Module], dtype: torch.dtype) -> None:
    """Install the casting hooks on ``units`` (modules of ``model``, not nested in one another's parameters) and
    on ``model`` for the parameters outside them. Floating-point parameters are computed in ``dtype``."""
    if not dtype.is_floating_point:
        raise ValueError(f"cast_parameters_for_compute: dtype must be a floating-point dtype, got {dtype}")
    unit_ids = {id(u) for u in units} - {id(model)}
    seen: set[int] = set()
    for unit in [model, *(u for u in units if u is not model)]:
        modules = _owned_modules(unit, unit_ids - {id(unit)})
        self_casting = [m for m in modules if getattr(m, "casts_own_parameters", False)]
        slots = [
            (m, name)
            for m in modules
            if m not in self_casting
            for name, p in m._parameters.items()
            if p is not None and p.is_floating_point()
        ]
        owned = {id(p) for m in modules for p in m._parameters.values() if p is not None and p.is_floating_point()}
        if owned & seen:
            raise ValueError(
                "cast_parameters_for_compute: a parameter is shared between two units; put the modules that "
                "share it in one unit"
            )
        seen |= owned
        hooks = _UnitCast(slots, self_casting, dtype)
        unit.register_forward_pre_hook(hooks.cast)
        unit.register_forward_hook(hooks.restore, always_call=True)
