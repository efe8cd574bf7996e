"""veofast's fused ops inside a transformers model, explicitly and without monkey-patching library source.

Usage (a Llama / Qwen2 / Qwen3 / Qwen2-MoE / Qwen3-MoE ``...ForCausalLM`` instance)::

    from veofast.integrations.transformers import apply_veofast_ops, causal_lm_loss

    model = AutoModelForCausalLM.from_config(config)        # or from_pretrained(...)
    apply_veofast_ops(model)                                  # in place; returns how many modules run veofast ops
    loss = causal_lm_loss(model, input_ids, labels)           # logits never exist
    loss.backward()

What ``apply_veofast_ops`` does, on this model instance only:

- every ``*RMSNorm`` module becomes a ``VeofastRMSNorm`` holding the *same* weight Parameter (``rms_norm``);
- every SwiGLU ``*MLP`` (``gate_proj`` / ``up_proj`` / ``down_proj``, SiLU) becomes a ``VeofastSwiGLUMLP`` holding the
  *same* three Linear modules (``swiglu`` between them);
- every stacked-experts module (``gate_up_proj (E, 2I, H)``, ``down_proj (E, H, I)``, transformers 5 layout) becomes a
  ``VeofastExperts`` holding the same Parameters (``moe_ffn``: permute, grouped GEMMs, unpermute);
- attention: ``veofast_attention_forward`` is registered under the name ``"veofast_varlen"`` through transformers'
  public ``AttentionInterface`` (and a mask function through ``AttentionMaskInterface`` that hands on the 2-D padding
  mask, so no (T, T) mask is ever built), and the model is switched to it with ``model.set_attn_implementation``.
  The attention weights are never formed: ``output_attentions=True`` raises (``set_attn_implementation("eager")``
  gives them back).

Parameter names, the state dict and any optimizer built before the swap stay valid: the Parameters are the same
objects. RoPE stays transformers' own (it runs inside the attention module before the attention function).
``causal_lm_loss`` runs the base model and ``fused_linear_cross_entropy`` on the LM head's weight.

Packed documents: pass ``cu_seqlens`` / ``max_seqlen`` to ``causal_lm_loss`` (forwarded as transformers'
``cu_seq_lens_q/k`` and ``max_length_q/k`` kwargs), or call the model with those kwargs yourself; otherwise
``position_ids`` that restart at 0 mark document starts (one device-to-host copy per forward), and without either
each row of the batch is one document. A 2-D ``attention_mask`` may pad anywhere (left, right, inside a row): the
padded tokens are left out of attention, and their attention outputs are zero. The labels shift over the whole packed
row, so the label at each document's first position must be -100 (veofast's collators and transformers'
``DataCollatorWithFlattening`` set it so); otherwise each document's last token is trained to predict the next
document's first token.

Inference: ``model(...)`` and ``model.generate(...)`` run with a KV cache (dynamic or static; a cache that drops
tokens, as a sliding-window one, raises). A decoding step's queries are the last keys of their row: the causal mask
is bottom-right aligned.

Mixed precision: under ``torch.autocast`` the attention inputs, the expert computation and the loss run in the
autocast dtype (as the Linear layers and SDPA would); without autocast they run in the inputs' dtype.
"""

from __future__ import annotations

import functools
import logging
import sys
import threading
import weakref
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from veofast.ops import fused_linear_cross_entropy, moe_ffn, rms_norm, swiglu, varlen_attention
from veofast.ops._backend import autocast_dtype

logger = logging.getLogger("veofast.integrations")

ATTENTION_NAME = "veofast_varlen"
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe")
IGNORE_INDEX = -100

__all__ = [
    "ATTENTION_NAME",
    "VeofastExperts",
    "VeofastRMSNorm",
    "VeofastSwiGLUMLP",
    "apply_veofast_ops",
    "causal_lm_loss",
    "register_veofast_attention",
    "veofast_attention_forward",
]


# ------------------------------------------------------------------------------------------------------ dtypes
def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The autocast dtype when autocast is on for the tensors' device, else the promoted dtype of the tensors."""
    dtype = autocast_dtype(tensors[0].device)
    if dtype is not None:
        return dtype
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


# ------------------------------------------------------------------------------------------------------ modules
class VeofastRMSNorm(nn.Module):
    """RMSNorm through ``veofast.ops.rms_norm``, sharing the replaced module's ``weight`` Parameter.

    ``x (..., H)`` -> ``(..., H)`` in ``promote_types(x.dtype, weight.dtype)`` (as transformers' Llama/Qwen RMSNorm).
    """

    def __init__(self, weight: nn.Parameter, eps: float, *, backend: str = "auto"):
        super().__init__()
        self.weight = weight
        self.variance_epsilon = eps
        self.backend = backend

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden_states, self.weight, self.variance_epsilon, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, backend={self.backend!r}"


class VeofastSwiGLUMLP(nn.Module):
    """``down_proj(swiglu(gate_proj(x), up_proj(x)))`` with the replaced MLP's own Linear modules.

    ``x (..., H)`` -> ``(..., H)``.
    """

    def __init__(self, gate_proj: nn.Linear, up_proj: nn.Linear, down_proj: nn.Linear, *, backend: str = "auto"):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        if gate.dtype != up.dtype:  # e.g. biases of another dtype; swiglu wants one dtype
            dtype = torch.promote_types(gate.dtype, up.dtype)
            gate, up = gate.to(dtype), up.to(dtype)
        return self.down_proj(swiglu(gate, up, backend=self.backend))


class VeofastExperts(nn.Module):
    """Stacked SwiGLU experts through ``veofast.ops.moe_ffn``, sharing the replaced module's Parameters.

    ``gate_up_proj (E, 2I, H)`` (gate rows first), ``down_proj (E, H, I)``. ``forward(hidden_states (N, H),
    top_k_index (N, K), top_k_weights (N, K))`` -> ``(N, H)`` in the compute dtype (the autocast dtype under autocast,
    else ``hidden_states``' dtype): the weighted sum of each token's experts, as transformers' experts module returns.
    """

    def __init__(self, gate_up_proj: nn.Parameter, down_proj: nn.Parameter, *, backend: str = "auto"):
        super().__init__()
        if gate_up_proj.dim() != 3 or down_proj.dim() != 3 or gate_up_proj.shape[0] != down_proj.shape[0]:
            raise ValueError(
                f"VeofastExperts: expected gate_up_proj (E, 2I, H) and down_proj (E, H, I), got "
                f"{tuple(gate_up_proj.shape)} and {tuple(down_proj.shape)}"
            )
        self.gate_up_proj, self.down_proj = gate_up_proj, down_proj
        self.num_experts = gate_up_proj.shape[0]
        self.backend = backend

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        dtype = autocast_dtype(hidden_states.device) or hidden_states.dtype
        return moe_ffn(
            hidden_states.to(dtype),
            top_k_index,
            top_k_weights.to(dtype),
            self.gate_up_proj.to(dtype),
            self.down_proj.to(dtype),
            check_ids=False,  # the router's top-k ids are in range; checking would cost a host sync
            backend=self.backend,
        )


# ---------------------------------------------------------------------------------------------------- attention
class _Layout(NamedTuple):
    """Where the ``(B * T)`` query and key tokens of one attention call go in ``varlen_attention``.

    ``index_q`` / ``index_k``: (kept,) flat positions of the tokens kept (None: all of them, in order);
    ``cu_q`` / ``cu_k``: (docs + 1,) int32 document boundaries over the kept tokens; ``max_q`` / ``max_k``: the
    longest document.
    """

    index_q: torch.Tensor | None
    cu_q: torch.Tensor
    max_q: int
    index_k: torch.Tensor | None
    cu_k: torch.Tensor
    max_k: int


_layout_cache = threading.local()


def _pack(starts: torch.Tensor, valid: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor, int]:
    """Documents over the flattened tokens of ``starts`` (B, L) bool: one begins at each True (every row's first
    position is one). Only the ``valid`` (B, L) tokens are kept (all when None), so a document may be empty.

    Returns ``(index (kept,) or None when all are kept, cu_seqlens (docs + 1,) int32, max_seqlen)``; reads the
    tensors on the host.
    """
    starts = starts.reshape(-1)
    bounds = torch.cat([starts.nonzero().flatten(), torch.full((1,), starts.numel(), device=starts.device)])
    index = None
    if valid is not None:
        valid = valid.reshape(-1)
        index = valid.nonzero().flatten()
        if index.numel() == valid.numel():
            index = None
        else:  # a boundary counts the kept tokens before it
            bounds = F.pad(valid.cumsum(0), (1, 0))[bounds]
    return index, bounds.to(torch.int32), int(bounds.diff().max().item())


def _row_starts(batch: int, length: int, device: torch.device) -> torch.Tensor:
    """(batch, length) bool, True at each row's first position."""
    starts = torch.zeros(batch, length, dtype=torch.bool, device=device)
    starts[:, 0] = True
    return starts


def _document_layout(
    batch: int,
    q_len: int,
    k_len: int,
    device: torch.device,
    position_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
) -> _Layout:
    """The documents of queries (B, q_len) and keys (B, k_len); ``q_len < k_len`` with a KV cache, the queries being
    the last ``q_len`` keys of each row.

    Each row is one document; without a cache, each position where ``position_ids`` (B or 1, q_len) restarts at 0
    also begins one. The tokens where the 2-D padding mask ``attention_mask`` (B, k_len) is 0 are left out (any
    padding: left, right, inner). Reading position ids or the mask needs device-to-host copies; the result is cached
    for the tensors' identity and version, so all layers of one forward share it.
    """
    restarts = position_ids if q_len == k_len else None  # with a cache, rows are documents (as in transformers)
    if attention_mask is None and restarts is None:  # no host copy: decoding steps stay asynchronous
        rows = torch.arange(batch + 1, device=device, dtype=torch.int32)
        return _Layout(None, rows * q_len, q_len, None, rows * k_len, k_len)
    tensors = tuple(t for t in (restarts, attention_mask) if t is not None)
    key = (batch, q_len, k_len, device, restarts is None, attention_mask is None)
    cacheable = not any(t.is_inference() for t in tensors)  # inference tensors have no version counter
    if cacheable:
        cache = getattr(_layout_cache, "value", None)
        if (
            cache is not None
            and cache[0] == key
            and all(ref() is t and version == t._version for (ref, version), t in zip(cache[1], tensors, strict=True))
        ):
            return cache[2]
    starts = _row_starts(batch, k_len, device)
    if restarts is not None:
        starts |= restarts.expand(batch, k_len) == 0
    valid = None if attention_mask is None else attention_mask.to(device=device, dtype=torch.bool)
    index_k, cu_k, max_k = _pack(starts, valid)
    if q_len == k_len:
        layout = _Layout(index_k, cu_k, max_k, index_k, cu_k, max_k)
    else:
        layout = _Layout(*_pack(_row_starts(batch, q_len, device), valid[:, k_len - q_len :]), index_k, cu_k, max_k)
    if cacheable:
        _layout_cache.value = (key, tuple((weakref.ref(t), t._version) for t in tensors), layout)
    return layout


def _as_int(value) -> int:
    return int(value.item()) if isinstance(value, torch.Tensor) else int(value)


def _tokens(x: torch.Tensor, index: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``x (B, H, T, D)`` -> ``(B * T, H, D)`` in ``dtype``; only the flat positions ``index (n,)``: ``(n, H, D)``."""
    batch, heads, length, head_dim = x.shape
    x = x.transpose(1, 2).reshape(batch * length, heads, head_dim)
    return (x if index is None else x.index_select(0, index)).to(dtype)


@torch.compiler.disable  # reads tensors on the host and caches the layout: runs eagerly inside a compiled model
def veofast_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """A transformers attention function (``AttentionInterface`` signature) that runs ``varlen_attention``.

    query: (B, Hq, Tq, D); key, value: (B, Hk, Tk, D) (GQA: Hq a multiple of Hk, no ``repeat_kv`` needed), Tk > Tq
    when decoding with a KV cache (the queries are the last Tq keys: causal masks are bottom-right aligned);
    ``attention_mask``: None or the 2-D (B, Tk) padding mask (any padding; the padded tokens are left out).
    Returns ``(out (B, Tq, Hq, D), None)``, zero at padded query positions. Documents come from ``cu_seq_lens_q/k`` +
    ``max_length_q/k`` kwargs (B must be 1), else from ``position_ids`` restarts, else one per row (module docstring).
    """
    batch, num_heads, q_len, head_dim = query.shape
    k_len = key.shape[2]
    if attention_mask is not None:
        shape = tuple(attention_mask.shape)
        if len(shape) != 2 or shape[0] != batch or not q_len <= shape[1] <= k_len:
            raise ValueError(
                f"{ATTENTION_NAME}: attention_mask must be a 2-D (batch, L) padding mask over the first L key slots, "
                f"with batch {batch} and {q_len} <= L <= {k_len}; got shape {shape}"
            )
        k_len = shape[1]  # a static KV cache's slots past L hold no tokens yet
        key, value = key[:, :, :k_len], value[:, :, :k_len]
    if dropout:
        raise ValueError(f"{ATTENTION_NAME}: attention dropout is not supported, got dropout={dropout}")
    if kwargs.get("output_attentions"):
        raise ValueError(
            f"{ATTENTION_NAME}: output_attentions=True is not supported (the fused kernel never forms the attention "
            "weights); for them, switch this model to eager attention: model.set_attn_implementation('eager')"
        )
    for name in ("sliding_window", "softcap"):
        # Qwen2-MoE keeps its window on the module and leaves it to the mask, which this function never builds
        setting = kwargs.get(name, getattr(module, name, None))
        if setting is not None:
            raise ValueError(f"{ATTENTION_NAME}: {name}={setting!r} ({type(module).__name__}) is not supported")
    if kwargs.get("cu_seq_lens_q") is not None:
        if batch != 1:
            raise ValueError(f"{ATTENTION_NAME}: packed inputs (cu_seq_lens_q given) need batch size 1, got {batch}")
        if attention_mask is not None:
            raise ValueError(f"{ATTENTION_NAME}: give either cu_seq_lens_q/k or an attention_mask, not both")
        cu_q = kwargs["cu_seq_lens_q"].to(device=query.device, dtype=torch.int32)
        cu_k = kwargs.get("cu_seq_lens_k")
        cu_k = cu_q if cu_k is None else cu_k.to(device=query.device, dtype=torch.int32)
        max_q = kwargs.get("max_length_q")
        if max_q is None:
            raise ValueError(f"{ATTENTION_NAME}: max_length_q must be given with cu_seq_lens_q")
        max_q = _as_int(max_q)
        max_k = max_q if kwargs.get("max_length_k") is None else _as_int(kwargs["max_length_k"])
        layout = _Layout(None, cu_q, max_q, None, cu_k, max_k)
    else:
        layout = _document_layout(batch, q_len, k_len, query.device, kwargs.get("position_ids"), attention_mask)
    dtype = _compute_dtype(query, key, value)
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else bool(causal)
    out = varlen_attention(
        _tokens(query, layout.index_q, dtype),
        _tokens(key, layout.index_k, dtype),
        _tokens(value, layout.index_k, dtype),
        layout.cu_q,
        layout.cu_k,
        layout.max_q,
        layout.max_k,
        causal=causal,
        softmax_scale=scaling,
        backend=getattr(module, "veofast_ops_backend", "auto"),
    )
    if layout.index_q is not None:
        out = out.new_zeros(batch * q_len, num_heads, head_dim).index_copy(0, layout.index_q, out)
    return out.view(batch, q_len, num_heads, head_dim), None


def _padding_mask(
    *,
    batch_size: int,
    kv_length: int,
    kv_offset: int = 0,
    attention_mask: torch.Tensor | None = None,
    q_length: int | None = None,
    q_offset: int | torch.Tensor = 0,
    cache_position: torch.Tensor | None = None,
    device: torch.device | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """Mask function for ``AttentionMaskInterface``: no (B, 1, T, T) mask is ever built.

    Returns the 2-D padding mask (B, L) given by the caller, else None when all ``kv_length`` key slots hold tokens,
    else (a static KV cache: the slots past the tokens seen so far are empty) an all-True (B, L) mask over the filled
    slots. The attention function attends only to the first L key slots. The tokens seen so far are
    ``q_offset + q_length``, or ``cache_position[-1] + 1`` in transformers releases that pass ``cache_position``
    (the queries' positions) instead.
    """
    if kv_offset:
        raise ValueError(
            f"{ATTENTION_NAME}: a KV cache that drops tokens (kv_offset={kv_offset}, e.g. a sliding-window cache) is "
            "not supported; use the default dynamic cache"
        )
    if attention_mask is not None:
        return attention_mask
    filled = _as_int(q_offset) + q_length if q_length is not None else _as_int(cache_position[-1]) + 1
    return None if filled == kv_length else torch.ones(batch_size, filled, dtype=torch.bool, device=device)


@functools.cache
def register_veofast_attention(name: str = ATTENTION_NAME) -> str:
    """Register ``veofast_attention_forward`` (and its mask function) under ``name`` with transformers' public
    ``AttentionInterface`` / ``AttentionMaskInterface``; returns ``name``. Idempotent."""
    from transformers import AttentionInterface

    AttentionInterface.register(name, veofast_attention_forward)
    try:
        from transformers.masking_utils import AttentionMaskInterface

        AttentionMaskInterface.register(name, _padding_mask)
    except ImportError:  # older transformers: a name without a mask function gets the raw 2-D mask anyway
        logger.info("transformers has no AttentionMaskInterface; %s receives the raw attention_mask", name)
    return name


# ---------------------------------------------------------------------------------------------------- the swap
def _is_rms_norm(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__.endswith("RMSNorm")
        and isinstance(weight, nn.Parameter)
        and weight.dim() == 1
        and hasattr(module, "variance_epsilon")
    )


def _is_swiglu_mlp(module: nn.Module) -> bool:
    return type(module).__name__.endswith("MLP") and all(
        isinstance(getattr(module, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")
    )


def _is_stacked_experts(module: nn.Module) -> bool:
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (
        type(module).__name__.endswith("Experts")
        and isinstance(gate_up, nn.Parameter)
        and isinstance(down, nn.Parameter)
        and gate_up.dim() == 3
        and down.dim() == 3
    )


_SWAPPED_KINDS = {VeofastRMSNorm: "norms", VeofastSwiGLUMLP: "mlp", VeofastExperts: "experts"}


def _check_experts_layout(name: str, module: nn.Module) -> None:
    """Raise for transformers expert layouts that differ from ``gate_up_proj (E, 2I, H)`` / ``down_proj (E, H, I)``."""
    problems = []
    if getattr(module, "has_bias", False) or getattr(module, "gate_up_proj_bias", None) is not None:
        problems.append("expert biases")
    if getattr(module, "is_transposed", False):
        problems.append("transposed expert weights")
    if not getattr(module, "is_concatenated", True):
        problems.append("interleaved gate/up rows")
    num_experts, two_inter, hidden = module.gate_up_proj.shape
    if tuple(module.down_proj.shape) != (num_experts, hidden, two_inter // 2) or two_inter % 2:
        problems.append(f"shapes {tuple(module.gate_up_proj.shape)} / {tuple(module.down_proj.shape)}")
    if problems:
        raise ValueError(f"apply_veofast_ops: experts module {name!r} has {', '.join(problems)}; not supported")


def apply_veofast_ops(
    model: nn.Module,
    *,
    backend: str = "auto",
    norms: bool = True,
    mlp: bool = True,
    experts: bool = True,
    attention: bool = True,
) -> dict[str, int]:
    """Swap veofast's fused ops into a transformers causal-LM instance, in place (module docstring).

    ``backend`` (``"auto"`` | ``"triton"`` | ``"torch"``) is passed to every op. Each flag turns one kind of swap
    on or off. Calling it again is harmless: modules swapped by an earlier call are kept, and those of the kinds
    turned on get the new ``backend``. Returns how many modules of each kind now run veofast's ops, an earlier call's
    included (``{"norms": n, "mlp": n, "experts": n, "attention": n}``). Raises ValueError, before changing anything,
    for model families and settings veofast does not cover (``attention_dropout``, a ``hidden_act`` other than SiLU).
    """
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(
            f"apply_veofast_ops: {type(model).__name__} has no config; pass the transformers model itself (for a "
            "wrapper such as DistributedDataParallel, its .module), before wrapping it"
        )
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"apply_veofast_ops: model_type {model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}"
        )
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"apply_veofast_ops: backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if attention and getattr(config, "attention_dropout", 0.0):
        raise ValueError(
            f"apply_veofast_ops: attention_dropout={config.attention_dropout} is not supported; set "
            "config.attention_dropout = 0 before building the model, or pass attention=False"
        )
    hidden_act = getattr(config, "hidden_act", "silu")
    if (mlp or experts) and hidden_act not in ("silu", "swish"):
        raise ValueError(
            f"apply_veofast_ops: hidden_act={hidden_act!r} is not supported (veofast's MLP and expert ops are SwiGLU, "
            "i.e. SiLU); pass mlp=False, experts=False to keep transformers' modules"
        )
    counts = {"norms": 0, "mlp": 0, "experts": 0, "attention": 0}
    enabled = {"norms": norms, "mlp": mlp, "experts": experts}
    attention_swapped = getattr(config, "_attn_implementation", None) == ATTENTION_NAME  # by an earlier call
    replacements: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        kind = _SWAPPED_KINDS.get(type(module))
        if kind is not None:  # swapped by an earlier call: kept and counted, whatever the flags
            if enabled[kind]:
                module.backend = backend
            counts[kind] += 1
            continue
        if not name:
            continue
        if norms and _is_rms_norm(module):
            replacements.append((name, VeofastRMSNorm(module.weight, module.variance_epsilon, backend=backend)))
            counts["norms"] += 1
        elif mlp and _is_swiglu_mlp(module):
            new = VeofastSwiGLUMLP(module.gate_proj, module.up_proj, module.down_proj, backend=backend)
            replacements.append((name, new))
            counts["mlp"] += 1
        elif experts and _is_stacked_experts(module):
            _check_experts_layout(name, module)
            replacements.append((name, VeofastExperts(module.gate_up_proj, module.down_proj, backend=backend)))
            counts["experts"] += 1
        elif (attention or attention_swapped) and type(module).__name__.endswith("Attention"):
            if attention:
                module.veofast_ops_backend = backend
            counts["attention"] += 1
    for name, new in replacements:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        new.train(parent.training)
        setattr(parent, child, new)
    if attention:
        name = register_veofast_attention()
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(name)
        else:
            config._attn_implementation = name
    logger.info("apply_veofast_ops: replaced %s", counts)
    return counts


# --------------------------------------------------------------------------------------------------------- loss
def causal_lm_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    shift_labels: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    backend: str = "auto",
    **model_kwargs,
) -> torch.Tensor:
    """The causal-LM loss of a transformers ``...ForCausalLM`` with ``fused_linear_cross_entropy``: no logits.

    input_ids: (B, T); labels: (B, T) HF-style, shifted here (position t predicts labels[t + 1]; -100 ignored), or
    ``shift_labels`` (B, T) already shifted. ``cu_seqlens (docs + 1,)`` / ``max_seqlen`` describe packed documents
    (B == 1; forwarded as ``cu_seq_lens_q/k``, ``max_length_q/k``); the label at each document's first position must
    then be -100, as the collators set it (the shift runs over the whole row). The loss is the sum over label tokens
    divided by ``num_items_in_batch`` when given, else their mean. For MoE configs with ``output_router_logits`` the
    router aux loss is added with ``router_aux_loss_coef``, as transformers does. Returns a 0-dim fp32 tensor.
    """
    if (labels is None) == (shift_labels is None):
        raise ValueError("causal_lm_loss: give exactly one of labels or shift_labels")
    config = model.config
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if base is None or base is model:
        raise ValueError(f"causal_lm_loss: {type(model).__name__} has no base model (expected a ...ForCausalLM)")
    if cu_seqlens is not None:
        if max_seqlen is None:
            raise ValueError("causal_lm_loss: max_seqlen (a Python int) must be given with cu_seqlens")
        model_kwargs.update(
            cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens, max_length_q=max_seqlen, max_length_k=max_seqlen
        )
    want_aux = bool(getattr(config, "output_router_logits", False))
    if want_aux:
        model_kwargs["output_router_logits"] = True
    model_kwargs["return_dict"] = True  # the router logits are read by name, whatever config.return_dict says
    outputs = base(
        input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False, **model_kwargs
    )
    hidden = outputs[0]
    head = model.get_output_embeddings()
    weight, bias = head.weight, getattr(head, "bias", None)
    dtype = autocast_dtype(hidden.device)
    if dtype is not None:
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    elif weight.dtype != hidden.dtype:
        weight = weight.to(hidden.dtype)
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    loss = fused_linear_cross_entropy(
        hidden,
        weight,
        shift_labels.to(hidden.device),
        bias=bias,
        ignore_index=IGNORE_INDEX,
        num_items_in_batch=num_items_in_batch,
        softcap=getattr(config, "final_logit_softcapping", None),
        backend=backend,
    )
    if want_aux:
        loss = loss + config.router_aux_loss_coef * _router_aux_loss(model, outputs, attention_mask)
    return loss


def _router_aux_loss(model: nn.Module, outputs, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The load-balancing loss, with the function of the model's own modeling module (as its forward uses it)."""
    modeling = sys.modules.get(type(model).__module__)
    aux_fn = getattr(modeling, "load_balancing_loss_func", None)
    router_logits = getattr(outputs, "router_logits", None)
    if aux_fn is None or router_logits is None:
        raise ValueError(
            f"causal_lm_loss: config.output_router_logits is set but {type(model).__name__} gives no router logits / "
            "load_balancing_loss_func; set config.output_router_logits = False"
        )
    config = model.config
    return aux_fn(router_logits, config.num_experts, config.num_experts_per_tok, attention_mask).float()
