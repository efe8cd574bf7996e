"""Config fields of real checkpoints against transformers: which parameters each family builds, the defaults of keys
a config.json leaves out, how the RoPE fields are read and overridden, and fields veofast must refuse."""

from __future__ import annotations

import json

import pytest
import torch
from hf_tiny import hf_config, random_hf_model, save_hf_checkpoint
from transformers import AutoModelForCausalLM

from veofast.integrations.transformers import apply_veofast_ops
from veofast.models import DecoderConfig, build_foundation_model
from veofast.models.hf_io import save_hf_weights

# The keys that fix the parameter shapes; every other key of a config.json may be left out.
SHAPE_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "num_experts",
    "num_local_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
)
YARN = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=8)


def _load_veofast(path, **overrides):
    return build_foundation_model(
        weights_path=str(path), init_device="cpu", ops_backend="torch", config_overrides=overrides or None
    )


def _load_transformers(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def _input_ids(vocab: int) -> torch.Tensor:
    """``(2, 19)`` token ids; 19 positions reach past the tiny configs' original RoPE lengths."""
    return torch.randint(0, vocab, (2, 19), generator=torch.Generator().manual_seed(1))


def _assert_same_logits(model, reference, input_ids) -> None:
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, reference(input_ids).logits, atol=1e-4, rtol=0)


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(param.shape) for name, param in model.named_parameters()}


@pytest.mark.parametrize(
    "case,overrides",
    [
        ("llama", dict(attention_bias=True)),
        ("qwen2", {}),
        ("qwen3", dict(attention_bias=True)),
        ("qwen2_moe", dict(qkv_bias=False)),
        ("qwen3_moe_aux", dict(attention_bias=True)),
    ],
)
def test_same_parameters_as_transformers(case, overrides):
    """Bias flags build the same projections (o_proj included) as transformers' model of the same config."""
    config = hf_config(case, **overrides)
    model = build_foundation_model(init_device="meta", config_overrides=config.to_dict())
    assert _shapes(model) == _shapes(AutoModelForCausalLM.from_config(config))


def _keep_shape_keys(config: dict) -> None:
    for key in set(config) - set(SHAPE_KEYS):
        del config[key]


def _add_yarn_rope_scaling(config: dict) -> None:
    """What model cards tell users to do for long context; transformers 5 reads it before ``rope_parameters``."""
    config["rope_scaling"] = dict(YARN)


def _drop_original_length(config: dict) -> None:
    """transformers then takes ``max_position_embeddings`` as the original length of the llama3 schedule."""
    del config["rope_parameters"]["original_max_position_embeddings"]
    config["max_position_embeddings"] = 32


def _original_length_at_top_level(config: dict) -> None:
    """transformers 5 takes a top-level ``original_max_position_embeddings`` (Phi-3's spelling) over the RoPE dict's."""
    config["original_max_position_embeddings"] = 8
    config["rope_parameters"].pop("original_max_position_embeddings")


@pytest.mark.parametrize(
    "case,edit",
    [
        ("llama", _keep_shape_keys),
        ("qwen2", _keep_shape_keys),
        ("qwen3", _keep_shape_keys),
        ("qwen2_moe", _keep_shape_keys),
        ("qwen3_moe_aux", _keep_shape_keys),  # norm_topk_prob left out: transformers' default is false
        ("qwen3", _add_yarn_rope_scaling),
        ("llama_tied_llama3_rope", _drop_original_length),
        ("llama_tied_llama3_rope", _original_length_at_top_level),
        ("qwen3_yarn", _original_length_at_top_level),
    ],
)
def test_edited_config_reads_as_transformers_reads_it(case, edit, tmp_path):
    """A config.json edited as users edit them: veofast computes what transformers computes, and the config it
    saves back describes the same model to transformers."""
    save_hf_checkpoint(case, tmp_path / "hf")
    config_path = tmp_path / "hf" / "config.json"
    config = json.loads(config_path.read_text())
    edit(config)
    config_path.write_text(json.dumps(config))

    reference = _load_transformers(tmp_path / "hf")
    model = _load_veofast(tmp_path / "hf")
    input_ids = _input_ids(reference.config.vocab_size)
    _assert_same_logits(model, reference, input_ids)
    save_hf_weights(model, str(tmp_path / "out"))
    _assert_same_logits(_load_transformers(tmp_path / "out"), reference, input_ids)


@pytest.mark.parametrize(
    "overrides,expected_rope",
    [
        (dict(rope_theta=5e5), dict(rope_type="default", rope_theta=5e5)),
        (dict(rope_scaling=YARN), dict(YARN, rope_theta=1e6)),  # keeps the checkpoint's theta
    ],
    ids=["rope_theta", "rope_scaling"],
)
def test_rope_overrides_reach_the_model_and_the_saved_config(overrides, expected_rope, tmp_path):
    """``config_overrides`` on a checkpoint whose ``rope_parameters`` hold theta 1e6 change only what they name."""
    save_hf_checkpoint("qwen3", tmp_path / "hf", rope_parameters=dict(rope_type="default", rope_theta=1e6))
    reference = random_hf_model(hf_config("qwen3", rope_parameters=expected_rope))  # same seed: same weights
    model = _load_veofast(tmp_path / "hf", **overrides)
    input_ids = _input_ids(reference.config.vocab_size)
    _assert_same_logits(model, reference, input_ids)
    save_hf_weights(model, str(tmp_path / "out"))
    _assert_same_logits(_load_transformers(tmp_path / "out"), reference, input_ids)


def test_attention_biases_no_transformers_config_describes_are_refused_on_export():
    with pytest.raises(ValueError, match="qwen3 model cannot have attention_bias=True .* o_proj_bias=False"):
        DecoderConfig(model_type="qwen3", attention_bias=True).to_hf_dict()
    with pytest.raises(ValueError, match="qwen2 model cannot have attention_bias=True .* o_proj_bias=True"):
        DecoderConfig(model_type="qwen2", attention_bias=True, o_proj_bias=True).to_hf_dict()


def test_integration_refuses_qwen2_moe_sliding_window():
    """Qwen2-MoE keeps its window on the attention module (not in the attention kwargs): refuse, don't drop it."""
    config = hf_config("qwen2_moe", use_sliding_window=True, sliding_window=4, max_window_layers=2)
    model = random_hf_model(config)
    apply_veofast_ops(model, backend="torch")
    with pytest.raises(ValueError, match=r"sliding_window=4 \(Qwen2MoeAttention\) is not supported"):
        model(_input_ids(config.vocab_size))


@pytest.mark.parametrize("missing", ["hidden_size", "num_experts_per_tok"])
def test_missing_size_key_is_named(missing):
    config = hf_config("qwen3_moe_aux").to_dict()
    del config[missing]
    with pytest.raises(ValueError, match=f"config: {missing} is missing from the qwen3_moe config"):
        DecoderConfig.from_hf_dict(config)


def test_misspelt_override_key_is_refused_and_unread_keys_are_logged(caplog):
    base = hf_config("qwen3").to_dict()
    with pytest.raises(ValueError, match="unknown key 'rope_thta'; did you mean 'rope_theta'"):
        build_foundation_model(init_device="meta", config_overrides={**base, "rope_thta": 5e5})
    with caplog.at_level("WARNING", logger="veofast.models"):
        build_foundation_model(init_device="meta", config_overrides={**base, "my_note": "kept"})
    assert "does not read ['my_note']" in caplog.text  # transformers' generic to_dict() fields are not listed


def test_a_checkpoints_own_keys_may_be_overridden(tmp_path):
    """A key the checkpoint's config.json holds is not an unknown key, even if veofast does not read it."""
    save_hf_checkpoint("qwen3", tmp_path / "hf")
    config_path = tmp_path / "hf" / "config.json"
    config = json.loads(config_path.read_text())
    config["custom_field"] = 1
    config_path.write_text(json.dumps(config))
    _load_veofast(tmp_path / "hf", custom_field=2)


@pytest.mark.parametrize("case", ["llama", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe_aux"])
def test_every_key_veofast_writes_is_one_it_reads(case):
    """READ_KEYS (the overrides check) covers every key of the config.json veofast saves."""
    from veofast.models.config import INERT_KEYS, READ_KEYS

    written = DecoderConfig.from_hf_dict(hf_config(case).to_dict()).replace(hf_config={}).to_hf_dict()
    assert set(written) <= READ_KEYS | INERT_KEYS


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(layer_types=["full_attention", "sliding_attention"]), "layer_types other than full_attention"),
        (dict(use_sliding_window=True, sliding_window=8), "use_sliding_window=true is not supported"),
        (dict(attention_dropout=0.1), "attention_dropout=0.1 is not supported"),
        (dict(model_type="mistral"), "model_type 'mistral' .* is not supported"),
        (dict(rope_parameters=dict(rope_type="dynamic", factor=2.0)), "rope type 'dynamic' is not supported"),
        (dict(quantization_config={"quant_method": "fp8"}), "quantization_config .* dequantize the checkpoint"),
        (dict(tie_word_embeddings="false"), "tie_word_embeddings must be true or false, got 'false'"),
        (dict(rope_scaling=dict(rope_type="llama3", factor=8.0)), "'llama3' needs low_freq_factor, high_freq_factor"),
        (dict(rope_scaling=dict(type="linear")), "rope type 'linear' needs factor"),
    ],
    ids=[
        "sliding_layer_types",
        "use_sliding_window",
        "attention_dropout",
        "model_type",
        "dynamic_rope",
        "quantization_config",
        "string_flag",
        "llama3_rope_keys",
        "linear_rope_factor",
    ],
)
def test_fields_veofast_does_not_implement_are_refused(changes, message):
    """Each raises a ValueError naming the field, rather than being ignored (or, for a string flag, read as true)."""
    config = {**hf_config("qwen3").to_dict(), **changes}
    with pytest.raises(ValueError, match=f"config: .*{message}"):
        DecoderConfig.from_hf_dict(config)
