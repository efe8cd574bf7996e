"""veofast's fused ops inside a transformers model, explicitly and without monkey-patching library source.

Usage (a Llama / Qwen2 / Qwen3 / Qwen2-MoE / Qwen3-MoE ``...ForCausalLM`` instance)::

    from veofast.integrations.transformers import apply_veofast_ops, causal_lm_loss

    model = AutoModelForCausalLM.from_config(config)        # or from_pretrained(...)
    apply_veofast_ops(model)                                  # in place; returns what it replaced
    loss = causal_lm_loss(model, input_ids, labels)           # logits never exist
    loss.backward()

What ``apply_veofast_ops`` does, on this model instance only:

- every ``*RMSNorm`` module becomes a ``VeofastRMSNorm`` holding the *same* weight Parameter (``rms_norm``);
- every SwiGLU ``*MLP`` (``gate_proj`` / ``up_proj`` / ``down_proj``, SiLU) becomes a ``VeofastSwiGLUMLP`` holding the
  *same* three Linear modules (``swiglu`` between them);
- every stacked-experts module (``gate_up_proj (E, 2I, H)``, ``down_proj (E, H, I)``, transformers 5 layout) becomes a
  ``VeofastExperts`` holding the same Parameters (``moe_ffn``: permute, grouped GEMMs, unpermute);
- attention: ``veofast_attention_forward`` is registered under the name ``"veofast_varlen"`` through transformers'
  public ``AttentionInterface`` (and a pass-through mask function through ``AttentionMaskInterface``, so no (T, T)
  mask is ever built), and the model is switched to it with ``model.set_attn_implementation``.

Parameter names, the state dict and any optimizer built before the swap stay valid: the Parameters are the same
objects. RoPE stays transformers' own (it runs inside the attention module before the attention function).
``causal_lm_loss`` runs the base model and ``fused_linear_cross_entropy`` on the LM head's weight.

Packed documents: pass ``cu_seqlens`` / ``max_seqlen`` to ``causal_lm_loss`` (forwarded as transformers'
``cu_seq_lens_q/k`` and ``max_length_q/k`` kwargs), or call the model with those kwargs yourself; otherwise
``position_ids`` that restart at 0 mark document starts (one device-to-host copy per forward), and without either
each row of the batch is one document. A 2-D ``attention_mask`` must be right padding (pads stay in their row:
harmless under causal masking as long as their labels are -100). The labels shift over the whole packed row, so the
label at each document's first position must be -100 (veofast's collators and transformers'
``DataCollatorWithFlattening`` set it so); otherwise each document's last token is trained to predict the next
document's first token.

Mixed precision: under ``torch.autocast`` the attention inputs, the expert computation and the loss run in the
autocast dtype (as the Linear layers and SDPA would); without autocast they run in the inputs' dtype.
"""

from __future__ import annotations

import functools
import logging
import sys
import threading
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from veofast.ops import fused_linear_cross_entropy, moe_ffn, rms_norm, swiglu, varlen_attention

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
def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype active for ``device``'s type, or None when autocast is off there."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The autocast dtype when autocast is on for the tensors' device, else the promoted dtype of the tensors."""
    dtype = _autocast_dtype(tensors[0].device)
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
        dtype = _autocast_dtype(hidden_states.device) or hidden_states.dtype
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
_layout_cache = threading.local()


def _same_ref(ref, obj) -> bool:
    return (ref is None and obj is None) or (ref is not None and ref() is obj)


def _document_layout(
    batch: int,
    seq_len: int,
    device: torch.device,
    position_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, int]:
    """``(cu_seqlens (docs + 1,) int32, max_seqlen)`` over the flattened ``(batch * seq_len)`` tokens.

    Documents start at each row start and, with ``position_ids``, wherever the position restarts at 0. Reading
    position ids or checking the mask needs one device-to-host copy; the result is cached for the tensors' identity,
    so all layers of one forward share it.
    """
    cache = getattr(_layout_cache, "value", None)
    key = (batch, seq_len, device)
    if (
        cache is not None
        and cache[0] == key
        and _same_ref(cache[1], position_ids)
        and _same_ref(cache[2], attention_mask)
        and cache[3] == (None if position_ids is None else position_ids._version)
    ):
        return cache[4]
    if attention_mask is not None:
        if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (batch, seq_len):
            raise ValueError(
                f"{ATTENTION_NAME}: attention_mask must be a 2-D (batch, seq_len) = ({batch}, {seq_len}) padding mask, "
                f"got shape {tuple(attention_mask.shape)}"
            )
        mask = attention_mask.bool()
        if not bool((mask[:, 1:] <= mask[:, :-1]).all()):
            raise ValueError(
                f"{ATTENTION_NAME}: attention_mask must be right padding (ones then zeros in every row); left or "
                "inner padding is not supported: pack the documents and pass cu_seqlens instead"
            )
    starts = torch.zeros(batch, seq_len, dtype=torch.bool, device=device)
    starts[:, 0] = True
    if position_ids is not None:
        starts |= position_ids.expand(batch, seq_len) == 0
    start_index = starts.reshape(-1).nonzero().flatten()
    total = torch.tensor([batch * seq_len], device=device, dtype=start_index.dtype)
    bounds = torch.cat([start_index, total])
    cu_seqlens = bounds.to(torch.int32)
    max_seqlen = int(torch.diff(bounds).max().item())
    result = (cu_seqlens, max_seqlen)
    _layout_cache.value = (
        key,
        None if position_ids is None else weakref.ref(position_ids),
        None if attention_mask is None else weakref.ref(attention_mask),
        None if position_ids is None else position_ids._version,
        result,
    )
    return result


def _as_int(value) -> int:
    return int(value.item()) if isinstance(value, torch.Tensor) else int(value)


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

    query: (B, Hq, T, D); key, value: (B, Hk, T, D) (GQA: Hq a multiple of Hk, no ``repeat_kv`` needed);
    ``attention_mask``: None or the 2-D (B, T) right-padding mask. Returns ``(out (B, T, Hq, D), None)``.
    Documents come from ``cu_seq_lens_q/k`` + ``max_length_q/k`` kwargs (B must be 1), else from ``position_ids``
    restarts, else one per row (module docstring). Training / prefill only: no KV cache (T must equal key length).
    """
    batch, num_heads, seq_len, head_dim = query.shape
    if key.shape[2] != seq_len:
        raise ValueError(
            f"{ATTENTION_NAME}: query length {seq_len} != key length {key.shape[2]}: decoding with a KV cache is not "
            "supported; use attn_implementation='sdpa' for generation"
        )
    if dropout:
        raise ValueError(f"{ATTENTION_NAME}: attention dropout is not supported, got dropout={dropout}")
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
    else:
        cu_q, max_q = _document_layout(batch, seq_len, query.device, kwargs.get("position_ids"), attention_mask)
        cu_k, max_k = cu_q, max_q
    dtype = _compute_dtype(query, key, value)
    q = query.transpose(1, 2).reshape(batch * seq_len, num_heads, head_dim).to(dtype)
    k = key.transpose(1, 2).reshape(batch * seq_len, key.shape[1], head_dim).to(dtype)
    v = value.transpose(1, 2).reshape(batch * seq_len, value.shape[1], head_dim).to(dtype)
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else bool(causal)
    out = varlen_attention(
        q,
        k,
        v,
        cu_q,
        cu_k,
        max_q,
        max_k,
        causal=causal,
        softmax_scale=scaling,
        backend=getattr(module, "veofast_ops_backend", "auto"),
    )
    return out.view(batch, seq_len, num_heads, head_dim), None


def _passthrough_mask(*args, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
    """Mask function for ``AttentionMaskInterface``: hand the 2-D padding mask (or None) to the attention function
    unchanged, so no (B, 1, T, T) mask is ever built."""
    return attention_mask


@functools.cache
def register_veofast_attention(name: str = ATTENTION_NAME) -> str:
    """Register ``veofast_attention_forward`` (and its mask function) under ``name`` with transformers' public
    ``AttentionInterface`` / ``AttentionMaskInterface``; returns ``name``. Idempotent."""
    from transformers import AttentionInterface

    AttentionInterface.register(name, veofast_attention_forward)
    try:
        from transformers.masking_utils import AttentionMaskInterface

        AttentionMaskInterface.register(name, _passthrough_mask)
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


def _is_swiglu_mlp(module: nn.Module, hidden_act: str) -> bool:
    return (
        type(module).__name__.endswith("MLP")
        and all(isinstance(getattr(module, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj"))
        and hidden_act in ("silu", "swish")
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
    on or off. Returns how many modules of each kind were replaced (``{"norms": n, "mlp": n, "experts": n,
    "attention": n}``). Raises ValueError for model families veofast does not cover.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"apply_veofast_ops: model_type {model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}"
        )
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"apply_veofast_ops: backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    hidden_act = getattr(config, "hidden_act", "silu")
    counts = {"norms": 0, "mlp": 0, "experts": 0, "attention": 0}
    replacements: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if not name or isinstance(module, (VeofastRMSNorm, VeofastSwiGLUMLP, VeofastExperts)):
            continue
        if norms and _is_rms_norm(module):
            replacements.append((name, VeofastRMSNorm(module.weight, module.variance_epsilon, backend=backend)))
            counts["norms"] += 1
        elif mlp and _is_swiglu_mlp(module, hidden_act):
            new = VeofastSwiGLUMLP(module.gate_proj, module.up_proj, module.down_proj, backend=backend)
            replacements.append((name, new))
            counts["mlp"] += 1
        elif experts and _is_stacked_experts(module):
            _check_experts_layout(name, module)
            replacements.append((name, VeofastExperts(module.gate_up_proj, module.down_proj, backend=backend)))
            counts["experts"] += 1
        elif attention and type(module).__name__.endswith("Attention"):
            module.veofast_ops_backend = backend
            counts["attention"] += 1
    for name, new in replacements:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        new.train(parent.training)
        setattr(parent, child, new)
    if attention:
        if getattr(config, "attention_dropout", 0.0):
            raise ValueError(f"apply_veofast_ops: attention_dropout={config.attention_dropout} is not supported")
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
    outputs = base(
        input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False, **model_kwargs
    )
    hidden = outputs[0]
    head = model.get_output_embeddings()
    weight, bias = head.weight, getattr(head, "bias", None)
    dtype = _autocast_dtype(hidden.device)
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
