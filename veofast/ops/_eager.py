"""Eager calls of veofast's custom ops without the dispatcher's per-call cost.

Each op is a ``torch.library.custom_op`` (with ``register_autograd`` where it is differentiable): that is what
torch.compile, fake tensors and tensor subclasses need. In plain eager mode the dispatcher only adds host time: a
two-tensor custom op with registered autograd costs about 72 us per call on the host, a plain
``torch.autograd.Function`` with the same body 17 us (CPU, torch 2.13). In the forward of the dense 1B training
step the host barely keeps ahead of the GPU. Measured on an H200 (same machine, alternating runs): one profiled step
left the GPU idle 16-24 ms in gaps through the custom ops and 1.7-1.9 ms with this path, and the host enqueued a
step in 84-112 ms instead of 113-116 ms; the unprofiled step time stayed within its run-to-run noise (162-175 ms).
``direct`` and ``with_autograd`` return callables that run the op's own implementation (through a plain
autograd.Function for the differentiable ones) when the call is plain eager, and the custom op otherwise: while
torch.compile traces, under a dispatch mode (fake tensors, make_fx), for tensor subclasses (DTensor) and for meta
tensors (the op's fake implementation answers).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def _plain_eager(args: tuple) -> bool:
    """Whether a call with ``args`` needs nothing from the dispatcher beyond the op's implementation."""
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return False
    return all(type(a) in _PLAIN_TYPES and not a.is_meta for a in args if isinstance(a, torch.Tensor))


def direct(op: Callable, impl: Callable) -> Callable:
    """The custom op ``op`` (implemented by ``impl``, no autograd) as a callable that runs ``impl`` in plain eager
    calls."""

    def call(*args):
        return impl(*args) if _plain_eager(args) else op(*args)

    return call


def first_order_only(name: str) -> Callable:
    """Decorate an autograd backward that is not itself differentiable (kernel launches) so that it raises a
    RuntimeError naming the op ``name`` when called with ``create_graph=True`` (a second-order gradient), rather than
    return gradients without a graph, whose contribution a gradient penalty would then silently miss. (torch's
    ``once_differentiable`` only raises when a later backward passes through its node, which
    ``torch.autograd.grad(..., inputs)`` skips.) Calls while torch.compile traces pass through."""

    def decorate(backward: Callable) -> Callable:
        @functools.wraps(backward)
        def checked(ctx, *grads):
            if torch.is_grad_enabled() and not torch.compiler.is_compiling():
                raise RuntimeError(
                    f"veofast.ops.{name}: second-order gradients are not supported on this path (backward with "
                    "create_graph=True)"
                )
            return backward(ctx, *grads)

        return checked

    return decorate


def with_autograd(
    op, impl: Callable, backward: Callable, setup_context: Callable, *, differentiable_backward: bool = False
) -> Callable:
    """Register ``backward``/``setup_context`` (``register_autograd`` signatures) on the custom op ``op``
    (implemented by ``impl``) and return it as a callable that runs plain eager calls through an
    ``autograd.Function`` with the same forward, setup_context and backward.

    ``differentiable_backward``: whether ``backward`` is itself differentiable (made of differentiable ops). When it
    is not (a kernel launch), the eager Function's backward is ``first_order_only``.

    The Function's forward takes ``ctx`` and calls ``setup_context`` itself: a Function that defines a separate
    ``setup_context`` has ``Function.apply`` bind its arguments through ``inspect.signature`` on every call
    (torch 2.11), which cost the dense 1B step's forward about 6 ms of host time (profiled) over its 65 calls."""
    op.register_autograd(backward, setup_context=setup_context)

    def forward(ctx, *inputs):
        output = impl(*inputs)
        setup_context(ctx, inputs, output)
        return output

    function = type(
        f"{impl.__name__}_eager",
        (torch.autograd.Function,),
        {
            "forward": staticmethod(forward),
            "backward": staticmethod(backward if differentiable_backward else first_order_only(op._name)(backward)),
        },
    )

    def call(*args):
        return function.apply(*args) if _plain_eager(args) else op(*args)

    return call
