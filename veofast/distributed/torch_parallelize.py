"""``build_parallelize_model``: wrap a single-device veofast model for data parallelism from outside.

FSDP2 (``fully_shard``) puts each decoder layer (and any ``basic_modules``) in its own unit and the rest
(embeddings, final norm, LM head) in the root unit, sharded over the parallel state's FSDP mesh (data x
sequence parallel). Mixed precision keeps fp32 master weights, computes in bf16 and reduces gradients in
fp32. A model built on the meta device is materialised after sharding, so each rank only ever allocates
its own shards; it is then loaded from its ``weights_path`` or initialised with the run's seed.
Expert parallelism and Ulysses sequence parallelism are applied here too, before sharding.

With a single rank there is nothing to shard, and FSDP2 would only copy (see ``mixed_precision``): the model
stays a plain module on the device, and the same units cast their fp32 parameters to bf16 for their forward
(``cast_parameters_for_compute``), which gives FSDP2's mixed-precision numerics with a third of the memory
traffic. FSDP2 is kept on one rank for CPU offload (it needs FSDP2) and for ``enable_compile``. DDP computes in
bf16 through the same casts.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

from veofast.models.auto import materialize_model

from .fsdp_copy_in import install_reduce_scatter_copy_in
from .load_balancing import apply_global_load_balancing
from .mixed_precision import cast_parameters_for_compute
from .parallel_state import get_parallel_state

logger = logging.getLogger("veofast.distributed")


@functools.cache
def _log_once(message: str) -> None:
    logger.warning(message)


def _is_on_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def _unit_class_names(model: nn.Module, basic_modules: list[str] | None) -> set[str]:
    """The class names of the model's layer units: its ``_no_split_modules`` and ``basic_modules``; ValueError
    naming those of ``basic_modules`` that no module of the model has."""
    names = set(getattr(model, "_no_split_modules", []) or []) | set(basic_modules or [])
    known = {type(m).__name__ for m in model.modules()}
    unknown = sorted(n for n in names if n not in known)
    if unknown:
        raise ValueError(f"basic_modules: no module class named {unknown} in the model (classes: {sorted(known)})")
    return names


def _wrap_classes(model: nn.Module, basic_modules: list[str] | None) -> list[nn.Module]:
    """The model's layer units (``_unit_class_names``), the model itself left out."""
    names = _unit_class_names(model, basic_modules)
    return [m for m in model.modules() if type(m).__name__ in names and m is not model]


def build_parallelize_model(
    model: nn.Module,
    *,
    enable_full_shard: bool = True,
    enable_mixed_precision: bool = True,
    enable_gradient_checkpointing: bool = False,
    init_device: str = "meta",
    enable_fsdp_offload: bool = False,
    basic_modules: list[str] | None = None,
    enable_compile: bool = False,
    global_load_balancing: bool = False,
    ulysses_transport: str = "auto",
    ulysses_head_chunks: int = 1,
    seed: int = 0,
) -> nn.Module:
    """Parallelise ``model`` according to ``get_parallel_state()`` and return it (FSDP2 wraps in place).

    ``dp_mode`` ``"fsdp2"`` shards parameters (ZeRO-3 with ``enable_full_shard``, else ZeRO-2: parameters
    stay gathered between forward and backward); ``"ddp"`` replicates them. ``enable_mixed_precision``
    computes in bf16 on CUDA (on CPU it stays fp32, logged once). ``enable_fsdp_offload`` keeps shards and
    optimizer state on the CPU. ``init_device`` is the device the model was built on.
    ``global_load_balancing`` forms an MoE model's load-balancing loss over all data-parallel ranks.
    ``ulysses_transport`` carries the Ulysses all-to-alls (``sequence_parallel.resolve_transport``);
    ``ulysses_head_chunks`` pipelines them in chunks of heads (``sequence_parallel.UlyssesAttention``).
    """
    ps = get_parallel_state()
    if ps.tp_enabled:
        raise NotImplementedError("build_parallelize_model: tensor parallelism (tp_size > 1) is not implemented")
    if ps.dp_mode == "fsdp1":
        raise ValueError("build_parallelize_model: dp_mode 'fsdp1' is not supported; use 'fsdp2' (or 'ddp')")
    if ps.dp_mode == "ddp" and (ps.sp_enabled or ps.ep_enabled or enable_fsdp_offload):
        raise ValueError("build_parallelize_model: dp_mode 'ddp' supports neither SP, EP nor offload; use 'fsdp2'")
    if enable_fsdp_offload and ps.device_type != "cuda":
        raise ValueError("build_parallelize_model: enable_fsdp_offload needs CUDA (the model is already on the CPU)")
    _unit_class_names(model, basic_modules)  # on every path, also where no unit is wrapped
    on_meta = _is_on_meta(model)
    if init_device == "meta" and not on_meta:
        raise ValueError("build_parallelize_model: init_device='meta' but the model's parameters are not on meta")

    if enable_gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if ps.ep_enabled:
        from .expert_parallel import apply_expert_parallel

        apply_expert_parallel(model, ps)
    if ps.sp_enabled:
        from .sequence_parallel import apply_sequence_parallel

        apply_sequence_parallel(model, ps, transport=ulysses_transport, head_chunks=ulysses_head_chunks)
    if global_load_balancing and not apply_global_load_balancing(model, ps) and model.config.is_moe:
        _log_once("the load-balancing loss stays per micro-batch: global_load_balancing combines data-parallel ranks, "
                  "and there is one")
    if enable_compile:
        for layer in _wrap_classes(model, None):
            layer.compile(dynamic=True)  # packed batches change length every step: no recompiles

    device = ps.device
    mixed = enable_mixed_precision and ps.device_type == "cuda"
    if enable_mixed_precision and not mixed:
        _log_once("mixed precision is off on CPU: bf16 compute is only used on CUDA")
    if ps.dp_mode == "fsdp2" and (ps.world_size > 1 or enable_fsdp_offload or enable_compile):
        install_reduce_scatter_copy_in()  # torch's copy-in costs CPU time that grows with the gradients' size
        # With one shard there is nothing to free by resharding, so parameters stay gathered after forward.
        fsdp_kwargs = {"mesh": ps.fsdp_mesh, "reshard_after_forward": enable_full_shard and ps.fsdp_size > 1}
        if mixed:
            # Inputs are not cast: activations are bf16 already (they come out of bf16 weights), and what else
            # flows between modules in fp32 must stay so (the RoPE frequencies would lose their precision).
            fsdp_kwargs["mp_policy"] = MixedPrecisionPolicy(
                param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False
            )
        if enable_fsdp_offload:
            fsdp_kwargs["offload_policy"] = CPUOffloadPolicy()
        if ps.ep_enabled:
            from .expert_parallel import shard_experts

            shard_experts(model, ps, fsdp_kwargs)
        for module in _wrap_classes(model, basic_modules):
            fully_shard(module, **fsdp_kwargs)
        root_kwargs = dict(fsdp_kwargs)
        if fsdp_kwargs["reshard_after_forward"]:
            # torch's default for the root: keep its parameters (embeddings, final norm, LM head) gathered after
            # forward. An explicit True would free them, and the fused loss, which reads lm_head.weight in its
            # own backward, would then touch freed memory.
            del root_kwargs["reshard_after_forward"]
        fully_shard(model, **root_kwargs)
        if on_meta:
            model.to_empty(device="cpu" if enable_fsdp_offload else device)
            materialize_model(model, seed=seed)
        elif init_device == "cpu" and not enable_fsdp_offload:
            model.to(device)
        return model

    # One rank, or DDP: materialise the full model on this rank (then replicate it with DDP).
    if on_meta:
        model.to_empty(device=device)
        materialize_model(model, seed=seed)
    model.to(device)
    if mixed and enable_compile:
        _log_once("dp_mode 'ddp' with enable_compile computes in fp32 (the bf16 casts are not applied to compiled "
                  "layers); use dp_mode 'fsdp2' for bf16 compute")
    elif mixed:
        cast_parameters_for_compute(model, _wrap_classes(model, basic_modules), torch.bfloat16)
    if ps.world_size == 1:
        return model
    device_ids = [ps.local_rank] if ps.device_type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, process_group=ps.dp_group)
