"""Config values a user can get wrong in ``config_overrides`` (a YAML file, the command line): each is a ValueError
that names the key, raised by ``build_config`` before any weight is allocated, instead of a ZeroDivisionError, a
model of the wrong shape, NaN RoPE frequencies or a key that is silently ignored."""

from __future__ import annotations

import pytest
from hf_tiny import TINY_QWEN3

from veofast.models import DecoderConfig, build_config, build_foundation_model

DENSE = dict(TINY_QWEN3)
MOE = dict(DENSE, model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)


def _rope(**fields) -> dict:
    return dict(DENSE, rope_scaling=fields)


BAD_CONFIGS = {
    "hidden_size_not_a_multiple_of_heads": (
        dict(DENSE, hidden_size=40, num_attention_heads=6),
        "hidden_size .40. is not a multiple of num_attention_heads .6.; set head_dim",
    ),
    "zero_heads": (dict(DENSE, num_attention_heads=0), "num_attention_heads must be an integer >= 1, got 0"),
    "zero_kv_heads": (dict(DENSE, num_key_value_heads=0), "num_key_value_heads must be an integer >= 1, got 0"),
    "zero_head_dim": (dict(DENSE, head_dim=0), "head_dim must be an integer >= 1, got 0"),
    "zero_vocab": (dict(DENSE, vocab_size=0), "vocab_size must be an integer >= 1, got 0"),
    "negative_hidden": (dict(DENSE, hidden_size=-32), "hidden_size must be an integer >= 1, got -32"),
    "zero_layers": (dict(DENSE, num_hidden_layers=0), "num_hidden_layers must be an integer >= 1, got 0"),
    "zero_intermediate": (dict(DENSE, intermediate_size=0), "intermediate_size must be an integer >= 1, got 0"),
    "float_hidden": (dict(DENSE, hidden_size=32.0), "hidden_size must be an integer >= 1, got 32.0"),
    "string_vocab": (dict(DENSE, vocab_size="61"), "vocab_size must be an integer >= 1, got '61'"),
    "bool_layers": (dict(DENSE, num_hidden_layers=True), "num_hidden_layers must be an integer >= 1, got True"),
    "yaml_string_eps": (
        dict(DENSE, rms_norm_eps="1e-6"),
        "rms_norm_eps must be a finite number > 0, got '1e-6' .* 1.0e-6",
    ),
    "negative_eps": (dict(DENSE, rms_norm_eps=-1e-6), "rms_norm_eps must be a finite number > 0"),
    "zero_rope_theta": (dict(DENSE, rope_theta=0), "rope_theta must be a finite number > 0, got 0"),
    "string_rope_theta": (dict(DENSE, rope_theta="1e4"), "rope_theta must be a finite number > 0, got '1e4'"),
    "zero_initializer_range": (dict(DENSE, initializer_range=0.0), "initializer_range must be a finite number > 0"),
    "experts_on_a_dense_family": (dict(DENSE, num_experts=4), "num_experts=4 but model_type 'qwen3' is a dense family"),
    "zero_experts_on_moe": (dict(MOE, num_experts=0), "num_experts must be an integer >= 1, got 0"),
    "float_top_k": (dict(MOE, num_experts_per_tok=2.0), "num_experts_per_tok must be an integer >= 1, got 2.0"),
    "zero_moe_intermediate": (dict(MOE, moe_intermediate_size=0), "moe_intermediate_size must be an integer >= 1"),
    "zero_sparse_step": (dict(MOE, decoder_sparse_step=0), "decoder_sparse_step must be an integer >= 1, got 0"),
    "mlp_only_layers_out_of_range": (
        dict(MOE, mlp_only_layers=[2]),
        r"mlp_only_layers must be a list of layer indices in \[0, num_hidden_layers=2\), got \[2\]",
    ),
    "mlp_only_layers_string": (dict(MOE, mlp_only_layers="1"), "mlp_only_layers must be a list .* got '1'"),
    "shared_expert_on_qwen3_moe": (
        dict(MOE, shared_expert_intermediate_size=16),
        "shared_expert_intermediate_size=16 but only qwen2_moe",
    ),
    "negative_shared_expert": (
        dict(MOE, model_type="qwen2_moe", shared_expert_intermediate_size=-1),
        "shared_expert_intermediate_size must be an integer >= 0",
    ),
    "string_aux_coef": (dict(MOE, router_aux_loss_coef="0.01"), "router_aux_loss_coef must be a finite number >= 0"),
    "linear_rope_zero_factor": (
        _rope(rope_type="linear", factor=0),
        "rope_scaling/rope_parameters factor must be a finite number > 0, got 0",
    ),
    "linear_rope_string_factor": (_rope(rope_type="linear", factor="2"), "factor must be a finite number > 0, got '2'"),
    "llama3_rope_inverted_band": (
        _rope(rope_type="llama3", factor=8.0, low_freq_factor=4.0, high_freq_factor=1.0),
        "high_freq_factor .1.0. must be greater than low_freq_factor .4.0.",
    ),
    "yarn_rope_zero_beta": (_rope(rope_type="yarn", factor=4.0, beta_fast=0), "beta_fast must be a finite number > 0"),
    "yarn_rope_float_original_length": (
        _rope(rope_type="yarn", factor=4.0, original_max_position_embeddings=8.5),
        "original_max_position_embeddings must be an integer",
    ),
    "partial_rotary_factor": (
        _rope(rope_type="linear", factor=2.0, partial_rotary_factor=0.5),
        "partial_rotary_factor=0.5 is not supported",
    ),
}


@pytest.mark.parametrize("name", list(BAD_CONFIGS))
def test_bad_value_is_a_value_error_naming_the_key(name):
    overrides, message = BAD_CONFIGS[name]
    with pytest.raises(ValueError, match=f"config: .*{message}"):
        build_config(config_overrides=overrides)


def test_refused_before_any_weight_is_allocated():
    """A 2**40-token vocabulary would take terabytes: the error comes first (was a ZeroDivisionError)."""
    with pytest.raises(ValueError, match="num_attention_heads must be an integer >= 1, got 0"):
        build_foundation_model(config_overrides=dict(DENSE, vocab_size=2**40, num_attention_heads=0), init_device="cpu")


@pytest.mark.parametrize(
    "key,suggestion",
    [
        ("num_layers", "num_hidden_layers"),
        ("num_kv_heads", "num_key_value_heads"),
        ("rms_eps", "rms_norm_eps"),
        ("norm_topk", "norm_topk_prob"),
        ("aux_loss_coef", "router_aux_loss_coef"),
        ("attn_bias", "attention_bias"),
        ("hidden_dim", "hidden_size"),
    ],
)
def test_misspelt_override_with_a_default_is_refused(key, suggestion):
    """Keys whose misspelling would leave a default in place (only logged before): an error with the suggestion."""
    with pytest.raises(ValueError, match=f"unknown key '{key}'; did you mean '{suggestion}'"):
        build_config(config_overrides={**MOE, key: 1})


def test_valid_edge_values_are_accepted():
    """Integers where floats are expected, a derived head_dim, an empty mlp_only_layers and a llama3 band."""
    rope = dict(
        rope_type="llama3", factor=8, low_freq_factor=1, high_freq_factor=4, original_max_position_embeddings=16
    )
    config = build_config(config_overrides=dict(MOE, rope_theta=500000, rope_scaling=rope, rms_norm_eps=0.00001))
    assert (config.head_dim, config.rope_theta, config.mlp_only_layers) == (8, 500000.0, [])
    config = build_config(
        config_overrides=dict(MOE, model_type="qwen2_moe", mlp_only_layers=(0,), num_key_value_heads=None)
    )
    assert (config.mlp_only_layers, config.num_key_value_heads) == ([0], 4)


def test_head_dim_that_is_not_hidden_over_heads_is_written_back():
    """A Qwen2 config whose head_dim is not hidden_size / num_attention_heads keeps head_dim in the config.json it
    writes (which reading now needs: without it, 40 / 6 is refused)."""
    config = build_config(
        config_overrides=dict(DENSE, model_type="qwen2", hidden_size=40, num_attention_heads=6, head_dim=6)
    )
    written = config.to_hf_dict()
    assert written["head_dim"] == 6 and DecoderConfig.from_hf_dict(written).head_dim == 6
