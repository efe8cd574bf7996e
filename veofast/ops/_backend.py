"""Choosing the implementation of an op: the Triton kernels or the plain-torch reference.

``backend="auto"`` takes Triton for CUDA tensors and the reference elsewhere; ``"triton"`` and ``"torch"``
force one. A backend that was asked for explicitly and cannot run raises; a fallback that ``auto`` takes on a
CUDA device (Triton not installed, or inputs the kernels do not take: ``triton_or_fallback``) is logged once.
Ops built on matmuls are decorated with ``casts_like_autocast``, so they work inside ``torch.autocast`` as
``F.linear`` and SDPA do.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
from collections.abc import Callable

import torch

logger = logging.getLogger("veofast.ops")

BACKENDS = ("auto", "triton", "torch")


_UNKNOWN = object()
_triton_import_error: object = _UNKNOWN  # set by the first call


@torch.compiler.assume_constant_result
def triton_import_error() -> str | None:
    """None when triton imports, else the reason it does not (found once; a module global rather than
    ``functools.cache``, whose wrapper torch.compile warns about in every compiled layer that picks a backend).
    A constant to torch.compile: otherwise its guard on the global's first value recompiled every graph traced
    before the first answer, on the next call."""
    global _triton_import_error
    if _triton_import_error is _UNKNOWN:
        try:
            import triton  # noqa: F401

            _triton_import_error = None
        except Exception as exc:  # ImportError, or a broken install
            _triton_import_error = f"{type(exc).__name__}: {exc}"
    return _triton_import_error


def triton_interpreting() -> bool:
    """True when Triton kernels run on the CPU through ``TRITON_INTERPRET=1``."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _log_fallback_once(op: str, reason: str) -> None:
    logger.warning("veofast.ops.%s: using the torch reference on CUDA because %s", op, reason)


def resolve_backend(op: str, backend: str, device: torch.device) -> str:
    """Return ``"triton"`` or ``"torch"`` for running ``op`` on ``device``.

    Raises ``ValueError`` for an unknown backend name and ``RuntimeError`` when ``backend="triton"`` was asked
    for but cannot run (no triton, or tensors on a CPU without ``TRITON_INTERPRET=1``).
    """
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    error = triton_import_error()
    runnable = error is None and (device.type == "cuda" or triton_interpreting())
    if backend == "triton":
        if error is not None:
            raise RuntimeError(f"{op}: backend='triton' was asked for but triton does not import ({error})")
        if not runnable:
            raise RuntimeError(
                f"{op}: backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on CPU); got device {device}"
            )
        return "triton"
    if device.type == "cuda":
        if error is None:
            return "triton"
        _log_fallback_once(op, f"triton does not import ({error})")
    return "torch"


def triton_or_fallback(op: str, backend: str, unsupported: str | None) -> str:
    """What runs once ``resolve_backend`` chose Triton: ``"triton"`` when the kernels take the inputs
    (``unsupported`` is None). Otherwise ``unsupported`` says why not: ``backend="triton"`` raises ``ValueError``
    with it, ``"auto"`` falls back to the torch reference (logged once)."""
    if unsupported is None:
        return "triton"
    if backend == "triton":
        raise ValueError(f"{op}: {unsupported}")
    _log_fallback_once(op, unsupported)
    return "torch"


# Device types torch.autocast knows (``torch.is_autocast_enabled("meta")`` raises).
_AUTOCAST_DEVICE_TYPES = ("cuda", "cpu")
# The dtypes autocast casts; it leaves float64 (and non-float tensors) as they are.
_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype ``torch.autocast`` computes in on ``device``'s type, or None when autocast is off there."""
    if device.type in _AUTOCAST_DEVICE_TYPES and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def _autocast_cast(value, dtype: torch.dtype):
    return value.to(dtype) if isinstance(value, torch.Tensor) and value.dtype in _AUTOCAST_ELIGIBLE else value


def casts_like_autocast(*operands: str) -> Callable[[Callable], Callable]:
    """Decorate a matmul-like public op so that it works inside ``torch.autocast`` as ``F.linear`` and SDPA do: when
    autocast is on for the device type of the first argument, the tensor arguments named ``operands`` that are
    fp32/fp16/bf16 go to the autocast dtype (a differentiable cast, so a fp32 weight gets a fp32 gradient; float64
    and None pass unchanged), and the op runs with autocast off, so its own precision rules (fp32 accumulation)
    hold rather than autocast's op lists. Outside autocast the call passes straight through. E.g.
    ``fused_linear_cross_entropy(hidden_bf16, lm_head.weight_fp32, labels)`` in a bf16 autocast region runs in
    bf16."""

    def wrap(op: Callable) -> Callable:
        params = list(inspect.signature(op).parameters)
        missing = set(operands) - set(params)
        assert not missing, f"{op.__name__} has no arguments {missing}"
        positions = {params.index(name) for name in operands}

        @functools.wraps(op)
        def call(*args, **kwargs):
            first = args[0] if args else next(iter(kwargs.values()), None)
            dtype = autocast_dtype(first.device) if isinstance(first, torch.Tensor) else None
            if dtype is None:
                return op(*args, **kwargs)
            args = tuple(_autocast_cast(a, dtype) if i in positions else a for i, a in enumerate(args))
            kwargs = {k: _autocast_cast(v, dtype) if k in operands else v for k, v in kwargs.items()}
            with torch.autocast(first.device.type, enabled=False):
                return op(*args, **kwargs)

        return call

    return wrap


def cuda_device_of(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """``torch.cuda.device(tensor.device)`` when ``tensor`` is on a CUDA device other than the current one, else a
    context that does nothing. Triton launches a kernel on the current device whatever its tensors' device (a
    tensor on ``cuda:1`` while ``cuda:0`` is current failed with "Pointer argument cannot be accessed from
    Triton"); torch's own ops run on their tensors' device, and so must ours."""
    if tensor.is_cuda and not torch.compiler.is_compiling() and tensor.get_device() != torch.cuda.current_device():
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


def on_inputs_device(op: Callable) -> Callable:
    """Decorate a public op to run with the device of its first tensor argument current (see ``cuda_device_of``).
    The backward needs nothing: autograd runs it with its tensors' device current. Under torch.compile the
    generated code sets the device itself."""

    @functools.wraps(op)
    def call(*args, **kwargs):
        for value in (*args, *kwargs.values()):
            if isinstance(value, torch.Tensor):
                with cuda_device_of(value):
                    return op(*args, **kwargs)
        return op(*args, **kwargs)

    return call
