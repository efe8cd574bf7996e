"""``DecoderConfig``: the one configuration every veofast decoder is built from, read from and written to a
Hugging Face ``config.json`` dict (Llama 3, Qwen2/2.5, Qwen3, Qwen2-MoE and Qwen3-MoE families).

Both RoPE spellings are understood: ``rope_theta`` + ``rope_scaling`` (transformers 4) and
``rope_parameters`` (transformers 5), with transformers 5's precedence when a config holds both. Left-out keys that
change the math without changing a shape (norm_topk_prob, RoPE, rms_norm_eps) default as transformers' configs of the
family do. Fields that would change the math but are not implemented (sliding windows, attention dropout, other
activations, a partial rotary factor, the dynamic and longrope RoPE types) raise rather than being ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("veofast.models")

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe")
_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}
_CAUSAL_LM_CLASS = {v: k for k, v in _ARCHITECTURES.items()}
_MOE_MODEL_TYPES = ("qwen2_moe", "qwen3_moe")
# integer fields that must be >= 1 (head_dim once given or derived)
_SIZE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
)


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
    attention_bias: bool = False  # biases on q/k/v
    o_proj_bias: bool = False  # a bias on the attention output projection (Llama/Qwen3 attention_bias=true)
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
        for name in _SIZE_FIELDS:
            if name != "head_dim" or self.head_dim is not None:
                _check_int(name, getattr(self, name), minimum=1)
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"config: hidden_size ({self.hidden_size}) is not a multiple of num_attention_heads "
                    f"({self.num_attention_heads}); set head_dim to give the attention heads their size"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"config: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"config: head_dim must be even for rotary embeddings, got {self.head_dim}")
        _check_number("rms_norm_eps", self.rms_norm_eps, positive=True)
        _check_number("rope_theta", self.rope_theta, positive=True)
        _check_number("initializer_range", self.initializer_range, positive=True)
        self._check_moe_fields()
        if self.ops_backend not in ("auto", "triton", "torch"):
            raise ValueError(f"ops_backend must be auto, triton or torch, got {self.ops_backend!r}")

    def _check_moe_fields(self) -> None:
        """ValueError for experts or a shared expert on a family whose transformers model has none (it would ignore
        them), or naming the MoE field that is out of range (checked when there are experts: only then is it used)."""
        _check_int("num_experts", self.num_experts, minimum=0)
        if self.num_experts and self.model_type not in _MOE_MODEL_TYPES:
            raise ValueError(
                f"config: num_experts={self.num_experts} but model_type {self.model_type!r} is a dense family; use "
                f"one of {_MOE_MODEL_TYPES} for a mixture of experts"
            )
        if self.shared_expert_intermediate_size and self.model_type != "qwen2_moe":
            raise ValueError(
                f"config: shared_expert_intermediate_size={self.shared_expert_intermediate_size} but only qwen2_moe "
                f"has a shared expert, not {self.model_type!r}"
            )
        if not self.num_experts:
            return
        _check_int("num_experts_per_tok", self.num_experts_per_tok, minimum=1)
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(
                f"config: num_experts_per_tok ({self.num_experts_per_tok}) must be at most num_experts "
                f"({self.num_experts})"
            )
        _check_int("moe_intermediate_size", self.moe_intermediate_size, minimum=1)
        _check_int("decoder_sparse_step", self.decoder_sparse_step, minimum=1)
        _check_int("shared_expert_intermediate_size", self.shared_expert_intermediate_size, minimum=0)
        _check_number("router_aux_loss_coef", self.router_aux_loss_coef, positive=False)
        layers = self.mlp_only_layers
        if not isinstance(layers, (list, tuple)) or any(
            isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.num_hidden_layers for i in layers
        ):
            raise ValueError(
                f"config: mlp_only_layers must be a list of layer indices in [0, num_hidden_layers="
                f"{self.num_hidden_layers}), got {layers!r}"
            )
        self.mlp_only_layers = list(layers)

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
        if any(kind != "full_attention" for kind in hf.get("layer_types") or ()):
            raise ValueError(f"config: layer_types other than full_attention are not supported: {hf['layer_types']}")
        if hf.get("quantization_config"):
            raise ValueError(
                f"config: quantization_config {hf['quantization_config']!r} is set; veofast trains unquantized weights "
                "only: dequantize the checkpoint first (e.g. load it with transformers and save_pretrained it in bf16)"
            )

        rope_theta, rope_scaling = _read_rope(hf)
        qkv_bias, o_proj_bias = _attention_biases(model_type, hf)
        _warn_qwen3_head_dim(model_type, hf)
        moe = model_type in _MOE_MODEL_TYPES
        num_heads, hidden_size = _require(hf, "num_attention_heads"), _require(hf, "hidden_size")
        _check_int("hidden_size", hidden_size, minimum=1)  # before 4 * hidden_size
        values = dict(
            model_type=model_type,
            vocab_size=_require(hf, "vocab_size"),
            hidden_size=hidden_size,
            intermediate_size=hf.get("intermediate_size", 4 * hidden_size),
            num_hidden_layers=_require(hf, "num_hidden_layers"),
            num_attention_heads=num_heads,
            num_key_value_heads=num_heads if hf.get("num_key_value_heads") is None else hf["num_key_value_heads"],
            head_dim=hf.get("head_dim"),  # None: hidden_size / num_attention_heads
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            attention_bias=qkv_bias,
            o_proj_bias=o_proj_bias,
            qk_norm=model_type in ("qwen3", "qwen3_moe"),
            tie_word_embeddings=_flag(hf, "tie_word_embeddings", False),
            initializer_range=hf.get("initializer_range", 0.02),
            ops_backend=ops_backend,
            hf_config=hf,
            # on a dense family: refused by __post_init__ (transformers would build a dense model and ignore them)
            num_experts=hf.get("num_experts") or hf.get("num_local_experts") or 0,
            shared_expert_intermediate_size=hf.get("shared_expert_intermediate_size") or 0,
        )
        if moe:
            num_experts = _require(hf, "num_experts", "num_local_experts")
            _check_int("num_experts", num_experts, minimum=1)
            values.update(
                num_experts=num_experts,
                num_experts_per_tok=_require(hf, "num_experts_per_tok"),
                moe_intermediate_size=_require(hf, "moe_intermediate_size"),
                norm_topk_prob=_flag(hf, "norm_topk_prob", False),  # both Qwen MoE configs default to false
                router_aux_loss_coef=hf.get("router_aux_loss_coef", 0.001),
                output_router_logits=_flag(hf, "output_router_logits", False),
                decoder_sparse_step=hf.get("decoder_sparse_step", 1),
                mlp_only_layers=hf.get("mlp_only_layers") or [],
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
        derived_head_dim = self.head_dim * self.num_attention_heads == self.hidden_size  # what reading derives
        if self.model_type in ("qwen2", "qwen2_moe") and "head_dim" not in self.hf_config and derived_head_dim:
            del hf["head_dim"]  # as transformers writes these families, whose configs have no head_dim field
        _write_rope(hf, self.rope_theta, self.rope_scaling)
        self._write_attention_biases(hf)
        if hf.get("layer_types") is not None:
            # one entry per layer, or transformers 5 refuses the config.json (num_hidden_layers may have been
            # overridden since the list was written); reading refused any kind but full attention
            hf["layer_types"] = ["full_attention"] * self.num_hidden_layers
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

    def _write_attention_biases(self, hf: dict[str, Any]) -> None:
        """Set the bias field of ``hf`` (``attention_bias`` or ``qkv_bias``); raise if the family cannot express
        this config's ``(attention_bias, o_proj_bias)``."""
        if self.model_type == "qwen2_moe":
            hf["qkv_bias"] = self.attention_bias
        elif self.model_type != "qwen2":
            hf["attention_bias"] = self.attention_bias
        if _attention_biases(self.model_type, hf) != (self.attention_bias, self.o_proj_bias):
            raise ValueError(
                f"config: a transformers {self.model_type} model cannot have attention_bias={self.attention_bias} "
                f"(q/k/v) with o_proj_bias={self.o_proj_bias}; no HF config.json describes this model"
            )

    def replace(self, **changes) -> DecoderConfig:
        return dataclasses.replace(self, **changes)


def _warn_qwen3_head_dim(model_type: str, hf: dict) -> None:
    """Log that a ``qwen3`` config without ``head_dim`` reads differently in transformers, whose Qwen3Config
    defaults head_dim to 128 where veofast derives hidden_size / num_attention_heads (as every other family does).

    The config.json veofast saves names head_dim, so its own exports read the same everywhere; a checkpoint whose
    weights were made with 128 fails to load with shape mismatches, which this line explains."""
    if model_type != "qwen3" or hf.get("head_dim") is not None:
        return
    heads, hidden = hf.get("num_attention_heads"), hf.get("hidden_size")
    if isinstance(heads, int) and isinstance(hidden, int) and heads > 0 and hidden // heads != 128:
        logger.warning(
            "config: a qwen3 config without head_dim: veofast uses hidden_size / num_attention_heads = %d, while "
            "transformers' Qwen3Config defaults head_dim to 128; set head_dim to say which one is meant",
            hidden // heads,
        )


def _require(hf: dict, *names: str) -> Any:
    """The value of the first of ``names`` that ``hf`` holds; a ValueError naming them when it holds none."""
    for name in names:
        if name in hf:
            return hf[name]
    raise ValueError(f"config: {' or '.join(names)} is missing from the {hf.get('model_type')} config")


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    """ValueError naming ``name`` unless ``value`` is an int (not a bool, nor a float such as YAML's ``32.0``) >=
    ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"config: {name} must be an integer >= {minimum}, got {value!r}")


def _check_number(name: str, value: Any, *, positive: bool) -> None:
    """ValueError naming ``name`` unless ``value`` is a finite int or float, > 0 when ``positive`` else >= 0 (YAML
    reads ``1e-6``, without a dot, as a string)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not number or value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        hint = (
            " (a string: YAML reads 1e-6, without a dot, as a string and 1.0e-6 as a number)"
            if isinstance(value, str)
            else ""
        )
        raise ValueError(f"config: {name} must be a finite number {bound}, got {value!r}{hint}")


def _flag(hf: dict, name: str, default: bool) -> bool:
    """The boolean ``hf[name]`` (``default`` when absent or null); a ValueError for any other type (``bool("false")``
    would be true)."""
    value = hf.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ValueError(f"config: {name} must be true or false, got {value!r}")
    return value


def _attention_biases(model_type: str, hf: dict) -> tuple[bool, bool]:
    """``(q/k/v bias, o_proj bias)`` as transformers builds the family's attention: Qwen2 always has q/k/v biases,
    Qwen2-MoE has them unless ``qkv_bias`` is false, and ``attention_bias`` gives Llama and Qwen3(-MoE) all four."""
    if model_type == "qwen2":
        return True, False
    if model_type == "qwen2_moe":
        return _flag(hf, "qkv_bias", True), False
    bias = _flag(hf, "attention_bias", False)
    return bias, bias


def _rope_source(hf: dict) -> tuple[float, dict]:
    """``(rope_theta, the dict of RoPE settings)`` as transformers 5 reads them: a non-empty ``rope_scaling``
    replaces ``rope_parameters`` (so a rope_scaling added to a config that transformers 5 wrote takes effect), and a
    ``rope_theta`` inside that dict wins over the top-level one."""
    params = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise ValueError(f"config: rope_scaling / rope_parameters must be a dict, got {params!r}")
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    _check_number("rope_theta", theta, positive=True)
    return float(theta), params


_ROPE_REQUIRED_KEYS = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor"), "yarn": ()}
# the RoPE dict's numbers, each > 0 when given, except the mscales (0 means unset, as in transformers)
_ROPE_NUMBERS = ("factor", "low_freq_factor", "high_freq_factor", "attention_factor", "beta_fast", "beta_slow")
_ROPE_KEYS = {"rope_type", "type", "original_max_position_embeddings", "partial_rotary_factor", "truncate"}
_ROPE_KEYS |= {*_ROPE_NUMBERS, "mscale", "mscale_all_dim"}


def _check_rope_values(rope_type: str, scaling: dict, hf: dict) -> None:
    """ValueError naming the RoPE field whose value transformers would compute nonsense from (or that veofast does
    not implement: a partial rotary factor); a warning for keys that neither reads, as transformers gives."""
    where = "rope_scaling/rope_parameters"
    for key in _ROPE_NUMBERS:
        if scaling.get(key) is not None:
            _check_number(f"{where} {key}", scaling[key], positive=True)
    for key in ("mscale", "mscale_all_dim"):
        if scaling.get(key) is not None:
            _check_number(f"{where} {key}", scaling[key], positive=False)
    if scaling.get("original_max_position_embeddings") is not None:
        _check_int(f"{where} original_max_position_embeddings", scaling["original_max_position_embeddings"], minimum=1)
    if rope_type == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise ValueError(
            f"config: {where} high_freq_factor ({scaling['high_freq_factor']}) must be greater than low_freq_factor "
            f"({scaling['low_freq_factor']})"
        )
    unknown = sorted(set(scaling) - _ROPE_KEYS)
    if unknown:
        logger.warning("config: %s of rope type %r holds keys veofast does not read: %s", where, rope_type, unknown)


def _check_partial_rotary(params: dict, hf: dict) -> None:
    """ValueError naming ``partial_rotary_factor`` unless it is unset or 1, for every RoPE type.

    The Llama and Qwen families of transformers do not implement a partial rotation: with the default RoPE they
    rotate all of head_dim whatever the factor says, and with a scaled RoPE their forward fails on the shorter
    frequency table. A config that sets it was meant for another model, so it is refused rather than read (or
    dropped from the config.json veofast saves) as a full rotation."""
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        raise ValueError(
            f"config: partial_rotary_factor={partial!r} is not supported (only 1: RoPE on all of head_dim); the "
            "Llama / Qwen families veofast implements have no partial rotary embedding"
        )


def _read_rope(hf: dict) -> tuple[float, dict | None]:
    """(rope_theta, scaling dict or None) from either the transformers 4 or the transformers 5 spelling."""
    theta, params = _rope_source(hf)
    typed = "rope_type" in params or "type" in params
    if params and not typed and all(isinstance(v, dict) for v in params.values()):
        raise ValueError("config: per-layer-type rope_parameters are not supported")
    _check_partial_rotary(params, hf)
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type not in _ROPE_REQUIRED_KEYS:
        raise ValueError(
            f"config: rope_scaling/rope_parameters rope type {rope_type!r} is not supported (veofast implements "
            "default, linear, llama3 and yarn)"
        )
    missing = [key for key in _ROPE_REQUIRED_KEYS[rope_type] if scaling.get(key) is None]
    if missing:
        raise ValueError(f"config: rope type {rope_type!r} needs {', '.join(missing)} in rope_scaling/rope_parameters")
    if rope_type in ("llama3", "yarn") and hf.get("original_max_position_embeddings") is not None:
        # transformers 5 lets a top-level original_max_position_embeddings win over the one in the RoPE dict
        scaling["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
    _check_rope_values(rope_type, scaling, hf)
    return theta, {**scaling, "rope_type": rope_type}


def _write_rope(hf: dict, theta: float, scaling: dict | None) -> None:
    """Write the RoPE settings into ``hf`` in the spelling it was read in: ``rope_parameters`` (then without a
    ``rope_scaling``, which transformers would read instead) or ``rope_theta`` + ``rope_scaling``."""
    if "rope_parameters" in hf:
        hf["rope_parameters"] = {"rope_theta": theta, **(scaling or {"rope_type": "default"})}
        hf.pop("rope_scaling", None)
        if "rope_theta" in hf:
            hf["rope_theta"] = theta
    else:
        hf["rope_theta"] = theta
        hf["rope_scaling"] = scaling


# Keys of a Hugging Face config dict that ``DecoderConfig.from_hf_dict`` reads (or refuses), and keys it leaves alone
# knowingly: token ids, dtypes, the sliding-window sizes (which only act when use_sliding_window, refused, is set),
# pretraining_tp (transformers 4 split Llama's matmuls into that many slices and summed them: the same math;
# transformers 5 ignores it) and the generic fields of transformers' PretrainedConfig.to_dict() that do not change a
# causal LM's training math.
READ_KEYS = frozenset(
    """architectures attention_bias attention_dropout decoder_sparse_step head_dim hidden_act hidden_size
    initializer_range intermediate_size layer_types max_position_embeddings mlp_bias mlp_only_layers model_type
    moe_intermediate_size norm_topk_prob num_attention_heads num_experts num_experts_per_tok num_hidden_layers
    num_key_value_heads num_local_experts original_max_position_embeddings output_router_logits partial_rotary_factor
    qkv_bias quantization_config rms_norm_eps rope_parameters rope_scaling rope_theta
    router_aux_loss_coef shared_expert_intermediate_size tie_word_embeddings use_sliding_window vocab_size""".split()
)
INERT_KEYS = frozenset(
    """bos_token_id eos_token_id pad_token_id sep_token_id decoder_start_token_id torch_dtype dtype use_cache
    transformers_version sliding_window max_window_layers pretraining_tp output_hidden_states output_attentions
    return_dict chunk_size_feed_forward is_encoder_decoder is_decoder add_cross_attention tie_encoder_decoder id2label
    label2id problem_type finetuning_task task_specific_params tokenizer_class prefix torchscript pruned_heads
    cross_attention_hidden_size""".split()
)


def check_override_keys(overrides: dict | None, base: dict) -> None:
    """Refuse a ``config_overrides`` key that is neither in ``base`` (the checkpoint's config.json) nor one veofast
    reads but is close to one of those (a misspelling, which would otherwise be silently ignored); log the other keys
    that veofast does not read (they are kept in the config.json it saves). Private keys (``_name_or_path``, ...)
    are transformers' own."""
    unread = [
        key for key in overrides or {} if key not in READ_KEYS | INERT_KEYS and key not in base and key[:1] != "_"
    ]
    for key in unread:
        close = difflib.get_close_matches(key, sorted(READ_KEYS), n=1, cutoff=0.7)
        if close:
            raise ValueError(f"config_overrides: unknown key {key!r}; did you mean {close[0]!r}?")
    if unread:
        logger.warning("config_overrides: veofast does not read %s (kept in the config.json it saves)", unread)


def apply_overrides(hf: dict, overrides: dict | None) -> dict:
    """``hf`` with ``overrides`` on top, where a RoPE override changes only what it names: an overriding
    ``rope_theta`` also replaces the theta inside ``rope_parameters`` / ``rope_scaling`` (read before the top-level
    one), and an overriding ``rope_scaling`` (read instead of ``rope_parameters``) keeps ``hf``'s theta unless it
    names its own."""
    overrides = overrides or {}
    merged = {**hf, **overrides}
    if "rope_theta" in overrides or "rope_scaling" in overrides:
        theta = overrides.get("rope_theta", _rope_source(hf)[0])
        for key in ("rope_parameters", "rope_scaling"):
            nested = merged.get(key)
            if isinstance(nested, dict) and nested and "rope_theta" not in (overrides.get(key) or {}):
                merged[key] = {**nested, "rope_theta": theta}
    return merged


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
