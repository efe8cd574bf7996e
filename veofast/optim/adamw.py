"""``AdamW``: torch's AdamW whose CUDA step is one Triton pass per parameter, with the gradient-clipping factor
applied inside it.

Same hyper-parameters, param groups, state (``step``, ``exp_avg``, ``exp_avg_sq``) and ``state_dict`` as
``torch.optim.AdamW``, so checkpoints move between the two. ``backend="auto"`` takes the Triton step when every
parameter is on CUDA (``kernels/adamw.py``: 8.7 ms instead of torch's fused 10.0 ms for 1.24e9 fp32 parameters on
an H200), and torch's implementation otherwise (foreach; also for what the kernel does not do: amsgrad,
maximize, sparse or complex tensors, a tensor learning rate). ``step(grad_scale=...)`` takes the clipping
factor of ``veofast.distributed.grad_norm.clip_coefficient``: the training loop's norm, clip and update of the 1B
model took 15.5 ms, against 18.0 ms with the gradients scaled in memory first and 19.7 ms with torch's fused AdamW
(H200; the two veofast figures with a variant whose pass also wrote bf16 weight copies, since dropped).
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from veofast.ops._backend import cuda_device_of, resolve_backend, triton_interpreting

OP = "AdamW"
# what the kernel takes: it computes in fp32, so float64 parameters take torch's step (fp64 math)
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# how torch's step runs, chosen by each optimizer and kept when a state dict is loaded
IMPLEMENTATION_FLAGS = ("foreach", "fused", "capturable", "differentiable")


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _without_step_hooks(step):
    """torch's ``step`` without the hook-running wrapper that ``torch.optim.Optimizer`` puts on a class's ``step``
    once an instance of it exists: called from inside this class's (wrapped) ``step``, it would run every step
    hook a second time."""
    return step.__wrapped__ if getattr(step, "hooked", False) else step


class AdamW(torch.optim.AdamW):
    """AdamW with decoupled weight decay: ``torch.optim.AdamW``'s arguments and results.

    ``backend``: "auto", "triton" (CUDA tensors, or CPU under ``TRITON_INTERPRET=1``) or "torch". Groups with
    ``amsgrad``, ``maximize``, a tensor ``lr`` or ``betas``, or float64 parameters take torch's step. Setting one of
    torch's ``foreach``, ``fused``, ``capturable`` or ``differentiable`` chooses torch's implementation:
    ``backend="auto"`` then means "torch", and ``"triton"`` raises ``ValueError``.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        backend: str = "auto",
    ):
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            foreach=foreach,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
        )
        torch_implementation = foreach is not None or fused is not None or capturable or differentiable
        if torch_implementation and backend == "triton":
            raise ValueError(
                "AdamW: backend='triton' runs veofast's step, while foreach/fused/capturable/differentiable choose "
                "torch's; pass backend='auto' or 'torch' with them, or leave them out"
            )
        devices = {p.device for group in self.param_groups for p in group["params"]}
        if backend == "auto" and (len(devices) != 1 or torch_implementation):
            backend = "torch"
        self.backend = resolve_backend(OP, backend, next(iter(devices)) if devices else torch.device("cpu"))
        if self.backend == "torch" and not torch_implementation and devices and all(d.type == "cuda" for d in devices):
            for group in self.param_groups:  # torch's fastest CUDA path where the Triton one is not taken
                group["fused"] = True

    def _triton_ready(self, group: dict) -> bool:
        """Whether the Triton step applies to ``group`` (the rest goes to torch)."""
        return (
            self.backend == "triton"
            and not group["amsgrad"]
            and not group["maximize"]
            and not group["capturable"]
            and not group["differentiable"]
            and not any(isinstance(x, torch.Tensor) for x in (group["lr"], *group["betas"]))
            and all(
                p.grad is None
                or (
                    p.dtype in KERNEL_DTYPES
                    and _local(p).is_contiguous()
                    and not p.grad.is_sparse
                    and (p.device.type == "cuda" or triton_interpreting())
                )
                for p in group["params"]
            )
        )

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's, keeping this optimizer's ``IMPLEMENTATION_FLAGS`` (a checkpoint of torch's fused or capturable
        AdamW continues in the Triton step, and the other way round), with every ``step`` where the group's step
        reads it: on the parameter's device for torch's fused and capturable steps, on the host otherwise (the
        Triton step reads it there for the bias corrections)."""
        own = [{key: group[key] for key in IMPLEMENTATION_FLAGS if key in group} for group in self.param_groups]
        super().load_state_dict(state_dict)
        for group, flags in zip(self.param_groups, own, strict=True):
            group.update(flags)
            on_device = group.get("fused") or group.get("capturable")
            for param in group["params"]:
                step = self.state.get(param, {}).get("step")
                if isinstance(step, torch.Tensor):
                    self.state[param]["step"] = step.to(param.device, torch.float32) if on_device else step.cpu()

    @torch.no_grad()
    def step(self, closure=None, *, grad_scale: torch.Tensor | None = None):
        """One update. ``grad_scale``: a 1-element tensor on the parameters' device by which every gradient is
        multiplied first (the gradient-clipping factor): the Triton step applies it as it reads the gradient and
        leaves ``.grad`` as it is; torch's steps scale ``.grad`` in place first. The step hooks run once."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        torch_groups = []
        for group in self.param_groups:
            if self._triton_ready(group):
                self._triton_step(group, grad_scale)
            else:
                torch_groups.append(group)
        if torch_groups and grad_scale is not None:
            grads = [_local(p.grad) for g in torch_groups for p in g["params"] if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, grad_scale.to(grads[0].device).reshape(()))
        if torch_groups:
            every_group = self.param_groups
            self.param_groups = torch_groups
            try:
                _without_step_hooks(torch.optim.AdamW.step)(self)
            finally:
                self.param_groups = every_group
        return loss

    def _triton_step(self, group: dict, grad_scale: torch.Tensor | None) -> None:
        from veofast.kernels.adamw import adamw_update_

        beta1, beta2 = group["betas"]
        for param in group["params"]:
            if param.grad is None:
                continue
            state = self.state[param]
            if not state:  # torch's layout of a non-fused AdamW state: the step count on the host
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["step"] += 1
            with cuda_device_of(param):
                adamw_update_(
                    _local(param),
                    _local(param.grad).contiguous(),
                    _local(state["exp_avg"]),
                    _local(state["exp_avg_sq"]),
                    lr=group["lr"],
                    beta1=beta1,
                    beta2=beta2,
                    eps=group["eps"],
                    weight_decay=group["weight_decay"],
                    step=int(state["step"].item()),
                    grad_scale=grad_scale,
                )
