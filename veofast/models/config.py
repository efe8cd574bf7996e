"""``DecoderConfig``: the one configuration every veofast decoder is built from, read from and written to a
Hugging Face ``config.json`` dict (Llama 3, Qwen2/2.5, Qwen3, Qwen2-MoE and Qwen3-MoE families).

Both RoPE spellings are understood: ``rope_theta`` + ``rope_scaling`` (transformers 4) and
``rope_parameters`` (transformers 5). Fields that would change the math but are not implemented (sliding
windows, attention dropout, other activations) raise rather than being ignored.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe")
_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}
_CAUSAL_LM_CLASS = {v: k for k, v in _ARCHITECTURES.items()}


@dataclass
class DecoderConfig:
    """Shapes and options of a decoder-only LM. ``num_experts == 0`` means a dense model."""

    model_type: str = "qwen3_moe"
    vocab_size: int = 32000
    hidden_size: int = 1024
    intermediate_size: int = 2816
    num_hidden_layers: int = 8
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int | None = None
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    attention_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    # Mixture of experts
    num_experts: int = 0
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 768
    norm_topk_prob: bool = True
    router_aux_loss_coef: float = 0.001
    output_router_logits: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list = field(default_factory=list)
    shared_expert_intermediate_size: int = 0
    # veofast-only: which implementation of the fused ops the layers call
    ops_backend: str = "auto"
    # the HF dict this config was read from, written back on export
    hf_config: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}")
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.num_experts and not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) must be in [1, num_experts={self.num_experts}]"
            )
        if self.ops_backend not in ("auto", "triton", "torch"):
            raise ValueError(f"ops_backend must be auto, triton or torch, got {self.ops_backend!r}")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Qwen-MoE rule: layer i is sparse unless listed in mlp_only_layers, every decoder_sparse_step-th."""
        if not self.is_moe or layer_idx in self.mlp_only_layers:
            return False
        return (layer_idx + 1) % self.decoder_sparse_step == 0

    # ------------------------------------------------------------------------------------------------ HF dicts

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], *, ops_backend: str = "auto") -> DecoderConfig:
        """Read a Hugging Face config dict; raise ValueError for options veofast does not implement."""
        hf = dict(hf)
        model_type = hf.get("model_type")
        if model_type is None:
            archs = [a for a in hf.get("architectures") or [] if a in _ARCHITECTURES]
            model_type = _ARCHITECTURES[archs[0]] if archs else None
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"config: model_type {model_type!r} (architectures {hf.get('architectures')}) is not supported; "
                f"supported: {SUPPORTED_MODEL_TYPES}"
            )
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config: hidden_act {hf['hidden_act']!r} is not supported (only 'silu')")
        if hf.get("use_sliding_window"):
            raise ValueError("config: use_sliding_window=true is not supported")
        if hf.get("attention_dropout", 0.0):
            raise ValueError(f"config: attention_dropout={hf['attention_dropout']} is not supported (only 0)")
        if hf.get("mlp_bias"):
            raise ValueError("config: mlp_bias=true is not supported")
        if hf.get("pretraining_tp", 1) not in (1, None):
            raise ValueError("config: pretraining_tp > 1 is not supported")

        rope_theta, rope_scaling = _read_rope(hf)
        moe = model_type in ("qwen2_moe", "qwen3_moe")
        num_heads = hf["num_attention_heads"]
        values = dict(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf.get("intermediate_size", 4 * hf["hidden_size"]),
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=num_heads,
            num_key_value_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            attention_bias=True
            if model_type == "qwen2"
            else bool(hf.get("qkv_bias", True))
            if model_type == "qwen2_moe"
            else bool(hf.get("attention_bias", False)),
            qk_norm=model_type in ("qwen3", "qwen3_moe"),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            initializer_range=hf.get("initializer_range", 0.02),
            ops_backend=ops_backend,
            hf_config=hf,
        )
        if moe:
            values.update(
                num_experts=hf["num_experts"] if "num_experts" in hf else hf["num_local_experts"],
                num_experts_per_tok=hf["num_experts_per_tok"],
                moe_intermediate_size=hf["moe_intermediate_size"],
                norm_topk_prob=bool(hf.get("norm_topk_prob", model_type == "qwen3_moe")),
                router_aux_loss_coef=hf.get("router_aux_loss_coef", 0.001),
                output_router_logits=bool(hf.get("output_router_logits", False)),
                decoder_sparse_step=hf.get("decoder_sparse_step", 1),
                mlp_only_layers=list(hf.get("mlp_only_layers") or []),
                shared_expert_intermediate_size=hf.get("shared_expert_intermediate_size", 0)
                if model_type == "qwen2_moe"
                else 0,
            )
        return cls(**values)

    def to_hf_dict(self) -> dict[str, Any]:
        """The HF config dict to write as ``config.json`` (the original one, with our shapes written over)."""
        hf = dict(self.hf_config)
        hf.update(
            model_type=self.model_type,
            architectures=[_CAUSAL_LM_CLASS[self.model_type]],
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            tie_word_embeddings=self.tie_word_embeddings,
            initializer_range=self.initializer_range,
            hidden_act="silu",
        )
        if "rope_parameters" not in hf:
            hf["rope_theta"] = self.rope_theta
            hf["rope_scaling"] = self.rope_scaling
        if self.model_type == "llama":
            hf["attention_bias"] = self.attention_bias
        if self.is_moe:
            hf.update(
                num_experts=self.num_experts,
                num_experts_per_tok=self.num_experts_per_tok,
                moe_intermediate_size=self.moe_intermediate_size,
                norm_topk_prob=self.norm_topk_prob,
                router_aux_loss_coef=self.router_aux_loss_coef,
                output_router_logits=self.output_router_logits,
                decoder_sparse_step=self.decoder_sparse_step,
                mlp_only_layers=list(self.mlp_only_layers),
            )
            if "num_local_experts" in hf:  # newer transformers 5 write Qwen3-MoE num_experts so
                hf["num_local_experts"] = self.num_experts
            if self.model_type == "qwen2_moe":
                hf["shared_expert_intermediate_size"] = self.shared_expert_intermediate_size
        return hf

    def replace(self, **changes) -> DecoderConfig:
        return dataclasses.replace(self, **changes)


def _read_rope(hf: dict) -> tuple[float, dict | None]:
    """(rope_theta, scaling dict or None) from either the transformers 4 or the transformers 5 spelling."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and params:
        if "rope_type" not in params and all(isinstance(v, dict) for v in params.values()):
            raise ValueError("config: per-layer-type rope_parameters are not supported")
        theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = hf.get("rope_theta", 10000.0)
        scaling = dict(hf["rope_scaling"]) if hf.get("rope_scaling") else None
    if scaling is not None:
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type == "default":
            scaling = None
        elif rope_type not in ("llama3", "yarn", "linear"):
            raise ValueError(f"config: rope type {rope_type!r} is not supported (default, linear, llama3, yarn)")
        else:
            scaling = {**scaling, "rope_type": rope_type}
    return float(theta), scaling


def load_hf_config_dict(config_path: str) -> dict:
    """Read ``config.json`` from a file path or a directory that holds one; errors name the path."""
    path = os.path.join(config_path, "config.json") if os.path.isdir(config_path) else config_path
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model config: no config.json at {config_path!r}")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"model config: {path} is not valid JSON: {exc}") from exc
