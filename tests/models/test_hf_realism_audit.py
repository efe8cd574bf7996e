"""Checkpoints as they are found on the hub, against transformers: config.json files written by transformers 4 (with
the keys veofast does not read, sliding-window sizes that are off, both RoPE spellings), bf16 weights in shards, tied
and untied heads of every family, the MoE options of the released Qwen MoE models, a generation_config.json, and a
directory that ``save_pretrained`` reused. Each is loaded into veofast (logits, loss, gradients against transformers
in fp32), saved back with ``save_hf_weights`` and read again by transformers (same tensors, config and logits); the
settings veofast does not implement are refused with the key named."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from hf_tiny import BASE, random_hf_model, read_checkpoint
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from veofast.models import DecoderConfig, build_foundation_model
from veofast.models.hf_io import save_hf_weights

SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
SMALL = {**{key: BASE[key] for key in SHAPE_KEYS}, "vocab_size": 300, "max_position_embeddings": 256}
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24)
LLAMA3 = dict(factor=32.0, high_freq_factor=4.0, low_freq_factor=1.0, original_max_position_embeddings=8)

# config.json files of released models as transformers 4 wrote them (sizes scaled down by SMALL): rope_theta +
# rope_scaling, torch_dtype, token ids, use_cache, sliding-window sizes with use_sliding_window false, ...
RELEASED = {
    "qwen2.5_tied": {
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "max_window_layers": 24,
        "model_type": "qwen2",
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.40.1",
        "use_cache": True,
        "use_sliding_window": False,
    },
    "qwen2.5_yarn": {  # the long-context rope_scaling the model cards give, in the old "type" spelling
        "architectures": ["Qwen2ForCausalLM"],
        "eos_token_id": 151645,
        "max_window_layers": 28,
        "model_type": "qwen2",
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_scaling": {"factor": 4.0, "original_max_position_embeddings": 8, "type": "yarn"},
        "rope_theta": 1000000.0,
        "sliding_window": 131072,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.43.1",
        "use_sliding_window": False,
    },
    "llama3.2_tied": {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "head_dim": 16,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {**LLAMA3, "rope_type": "llama3"},
        "rope_theta": 500000.0,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.45.0.dev0",
    },
    "llama2_tp2": {  # fp16 weights; pretraining_tp only split the matmuls in transformers 4: the same math
        "architectures": ["LlamaForCausalLM"],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "model_type": "llama",
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "pretraining_tp": 2,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "transformers_version": "4.32.0.dev0",
    },
    "qwen3_tied_head_dim": {  # head_dim 32 != hidden_size / num_attention_heads, q/k norms
        "architectures": ["Qwen3ForCausalLM"],
        "attention_bias": False,
        "head_dim": 32,
        "max_window_layers": 28,
        "model_type": "qwen3",
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "sliding_window": None,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.51.0",
        "use_sliding_window": False,
    },
    "qwen3_moe": {
        "architectures": ["Qwen3MoeForCausalLM"],
        "decoder_sparse_step": 1,
        "head_dim": 32,
        "max_window_layers": 48,
        "mlp_only_layers": [],
        "model_type": "qwen3_moe",
        "norm_topk_prob": True,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "output_router_logits": False,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "router_aux_loss_coef": 0.001,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.51.0",
        "use_sliding_window": False,
        **MOE,
    },
    "qwen1.5_moe": {  # shared expert with its sigmoid gate, norm_topk_prob false
        "architectures": ["Qwen2MoeForCausalLM"],
        "decoder_sparse_step": 1,
        "max_window_layers": 21,
        "model_type": "qwen2_moe",
        "norm_topk_prob": False,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "output_router_logits": False,
        "rope_theta": 1000000.0,
        "shared_expert_intermediate_size": 40,
        "sliding_window": 32768,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.36.0.dev0",
        "use_sliding_window": False,
        **MOE,
    },
    # the MoE layouts of config keys the released models leave at their defaults, with the aux loss in the loss
    "qwen2_moe_sparse_step_aux": {
        "architectures": ["Qwen2MoeForCausalLM"],
        "model_type": "qwen2_moe",
        "num_hidden_layers": 4,
        "decoder_sparse_step": 2,
        "mlp_only_layers": [3],
        "shared_expert_intermediate_size": 40,
        "norm_topk_prob": True,
        "output_router_logits": True,
        "router_aux_loss_coef": 0.05,
        "tie_word_embeddings": True,
        **MOE,
    },
    "qwen3_moe_sparse_step_aux": {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "head_dim": 16,
        "num_hidden_layers": 4,
        "decoder_sparse_step": 2,
        "mlp_only_layers": [1],
        "norm_topk_prob": False,
        "output_router_logits": True,
        "router_aux_loss_coef": 0.05,
        "tie_word_embeddings": True,
        **MOE,
    },
}


def _dtype(name: str) -> torch.dtype:
    """The dtype of the RELEASED checkpoint's tensors: its config's torch_dtype, bf16 when it names none."""
    return getattr(torch, RELEASED[name].get("torch_dtype", "bfloat16"))


def _write_released_like(name: str, path) -> None:
    """A checkpoint in 30 KB shards made by transformers' ``save_pretrained`` (bf16 or fp16 tensors), whose config.json
    is then replaced by the RELEASED one (as the hub serves it)."""
    config = {**RELEASED[name], **{k: v for k, v in SMALL.items() if k not in RELEASED[name]}}
    model_type = config["model_type"]
    hf_config = AutoConfig.for_model(model_type, **{k: v for k, v in config.items() if k != "model_type"})
    random_hf_model(hf_config).to(_dtype(name)).save_pretrained(path, max_shard_size="30KB")
    (path / "config.json").write_text(json.dumps(config, indent=2))


def _load_transformers(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def _load_veofast(path):
    return build_foundation_model(weights_path=str(path), init_device="cpu", ops_backend="torch")


def _inputs(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(2, 23)`` ids and labels (some ignored); 23 positions reach past the original RoPE lengths above."""
    input_ids = torch.randint(0, vocab, (2, 23), generator=torch.Generator().manual_seed(1))
    labels = input_ids.clone()
    labels[0, :4] = -100
    return input_ids, labels


def _close(actual: torch.Tensor, expected: torch.Tensor, rel: float, name: str = "") -> None:
    """``|actual - expected| <= rel * max|expected|`` elementwise (errors relative to the tensor's scale)."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, atol=rel * scale, rtol=rel, msg=lambda m: f"{name}: {m}")


def _config_dict(path) -> dict:
    config = AutoConfig.from_pretrained(path).to_dict()
    for key in ("transformers_version", "_name_or_path", "dtype", "torch_dtype"):
        config.pop(key, None)
    return config


@pytest.mark.parametrize("name", list(RELEASED))
def test_released_like_checkpoint(name, tmp_path):
    """Loaded as transformers loads it (fp32 parameters from bf16 / fp16 shards), the same logits, loss (with the aux
    loss where it is on) and gradients; saved back in the checkpoint's dtype bit for bit, with a config.json that
    transformers reads as the same."""
    _write_released_like(name, tmp_path / "hf")
    reference = _load_transformers(tmp_path / "hf")
    model = _load_veofast(tmp_path / "hf")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    input_ids, labels = _inputs(reference.config.vocab_size)

    with torch.no_grad():
        expected = reference(input_ids).logits
        _close(model(input_ids).logits, expected, 1e-5, "logits")
    reference_out, out = reference(input_ids, labels=labels), model(input_ids, labels=labels)
    _close(out.loss, reference_out.loss, 1e-5, "loss")
    reference_out.loss.backward()
    out.loss.backward()
    reference_grads = dict(reference.named_parameters())
    for param_name, param in model.named_parameters():
        _close(param.grad, reference_grads[param_name].grad, 1e-4, param_name)

    save_hf_weights(model, str(tmp_path / "out"), dtype=_dtype(name), max_shard_size="30KB")
    original, saved = read_checkpoint(tmp_path / "hf"), read_checkpoint(tmp_path / "out")
    assert saved.keys() == original.keys()
    for key, tensor in original.items():
        assert saved[key].dtype == _dtype(name) and torch.equal(saved[key], tensor), key
    assert _config_dict(tmp_path / "out") == _config_dict(tmp_path / "hf")
    with torch.no_grad():
        torch.testing.assert_close(_load_transformers(tmp_path / "out")(input_ids).logits, expected, atol=0, rtol=0)


def test_extra_keys_of_old_checkpoints_load_and_are_not_saved_back(tmp_path):
    """An old tied Llama checkpoint: RoPE frequencies stored per layer (``rotary_emb.inv_freq``) and ``lm_head.weight``
    stored although tied. Both load (the frequencies are recomputed, the head equals the embeddings) and the export
    holds what transformers' own save_pretrained of that checkpoint holds."""
    config = AutoConfig.for_model("llama", **SMALL, tie_word_embeddings=True)
    random_hf_model(config).bfloat16().save_pretrained(tmp_path / "hf")
    tensors = read_checkpoint(tmp_path / "hf")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    head_dim = SMALL["hidden_size"] // SMALL["num_attention_heads"]
    for layer in range(SMALL["num_hidden_layers"]):
        tensors[f"model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = torch.rand(head_dim // 2)
    save_file(tensors, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})

    reference = _load_transformers(tmp_path / "hf")
    model = _load_veofast(tmp_path / "hf")
    input_ids, _ = _inputs(SMALL["vocab_size"])
    with torch.no_grad():
        _close(model(input_ids).logits, reference(input_ids).logits, 1e-5)
    save_hf_weights(model, str(tmp_path / "out"), dtype=torch.bfloat16)
    reference.bfloat16().save_pretrained(tmp_path / "transformers_out")
    saved, expected = read_checkpoint(tmp_path / "out"), read_checkpoint(tmp_path / "transformers_out")
    assert saved.keys() == expected.keys() and "lm_head.weight" not in saved
    assert all(torch.equal(saved[key], expected[key]) for key in saved)


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3", "qwen2_moe"])
def test_layer_types_follow_an_overridden_layer_count_on_export(model_type, tmp_path):
    """transformers 5 writes ``layer_types`` (one per layer) into these families' config.json. A model built from such
    a config with ``num_hidden_layers`` overridden (a smaller model of a released shape, trained from scratch) was
    saved with the old list, which transformers refuses to load (was: "num_hidden_layers (3) must be equal to the
    number of layer_types (2)")."""
    extra = MOE if model_type.endswith("_moe") else {}
    AutoConfig.for_model(model_type, **SMALL, **extra).save_pretrained(tmp_path / "base")
    assert json.loads((tmp_path / "base" / "config.json").read_text())["layer_types"] == ["full_attention"] * 2
    model = build_foundation_model(
        config_path=str(tmp_path / "base"),
        init_device="cpu",
        ops_backend="torch",
        config_overrides={"num_hidden_layers": 3},
    )
    save_hf_weights(model, str(tmp_path / "out"))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["layer_types"] == ["full_attention"] * 3
    reloaded = _load_transformers(tmp_path / "out")
    assert reloaded.config.num_hidden_layers == 3
    input_ids, _ = _inputs(SMALL["vocab_size"])
    with torch.no_grad():
        _close(model(input_ids).logits, reloaded(input_ids).logits, 1e-5)


def test_single_file_wins_over_a_stale_index(tmp_path):
    """``save_pretrained`` into a directory that held a sharded save deletes the shards but not their index;
    transformers then loads ``model.safetensors``, and so does veofast (was: FileNotFoundError for the shards)."""
    config = AutoConfig.for_model("llama", **SMALL)
    random_hf_model(config, seed=0).save_pretrained(tmp_path, max_shard_size="30KB")
    random_hf_model(config, seed=1).save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors.index.json").exists() and (tmp_path / "model.safetensors").exists()
    reference = _load_transformers(tmp_path).state_dict()
    for name, tensor in _load_veofast(tmp_path).state_dict().items():
        assert torch.equal(tensor, reference[name]), name


def test_generation_config_travels_with_the_export(tmp_path):
    """A chat model's generation_config.json (its end-of-turn ids, sampling defaults) is part of the checkpoint;
    transformers' save_pretrained keeps it, and so does save_hf_weights (was: dropped, so generate() ran past the
    end of a turn)."""
    model = random_hf_model(AutoConfig.for_model("qwen3", **SMALL, head_dim=16))
    model.generation_config = GenerationConfig(eos_token_id=[7, 5], pad_token_id=5, temperature=0.6, do_sample=True)
    model.save_pretrained(tmp_path / "hf")
    save_hf_weights(_load_veofast(tmp_path / "hf"), str(tmp_path / "out"))
    saved = GenerationConfig.from_pretrained(tmp_path / "out")
    assert saved.eos_token_id == [7, 5] and saved.temperature == 0.6 and saved.do_sample
    assert saved.to_diff_dict() == GenerationConfig.from_pretrained(tmp_path / "hf").to_diff_dict()


@pytest.mark.parametrize(
    "rope",
    [
        dict(partial_rotary_factor=0.5),  # transformers 4's top-level spelling
        dict(rope_parameters=dict(rope_type="default", rope_theta=1e4, partial_rotary_factor=0.5)),
        dict(rope_scaling=dict(rope_type="linear", factor=2.0, partial_rotary_factor=0.5)),
    ],
    ids=["top_level", "default_rope_parameters", "linear_rope_scaling"],
)
def test_partial_rotary_factor_is_refused_for_every_rope_type(rope):
    """With the default RoPE transformers' Llama / Qwen models ignore the factor (and veofast read it as a full
    rotation, then left it out of the config.json it saved); with a scaled one they fail. Refused, named."""
    config = {**AutoConfig.for_model("llama", **SMALL).to_dict(), **rope}
    if "rope_scaling" in rope:
        del config["rope_parameters"]  # a transformers 4 config.json: rope_theta + rope_scaling
    with pytest.raises(ValueError, match=r"config: partial_rotary_factor=0.5 is not supported"):
        DecoderConfig.from_hf_dict(config)


@pytest.mark.parametrize(
    "model_type,changes,message",
    [
        ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1), "use_sliding_window=true"),
        ("qwen2_moe", dict(use_sliding_window=True, sliding_window=8, max_window_layers=2), "use_sliding_window=true"),
        ("qwen3_moe", dict(use_sliding_window=True, sliding_window=8), "use_sliding_window=true"),
        ("qwen3", dict(layer_types=["sliding_attention", "full_attention"]), "layer_types other than full_attention"),
        ("llama", dict(rope_scaling=dict(rope_type="dynamic", factor=2.0)), "rope_scaling/rope_parameters rope type"),
        (
            "qwen2",
            dict(rope_scaling=dict(rope_type="longrope", short_factor=[1.0] * 8, long_factor=[2.0] * 8)),
            "rope_scaling/rope_parameters rope type 'longrope' is not supported",
        ),
    ],
    ids=["qwen2_window", "qwen2_moe_window", "qwen3_moe_window", "qwen3_layer_types", "dynamic_rope", "longrope"],
)
def test_settings_that_change_the_math_are_refused_naming_the_key(model_type, changes, message):
    """Sliding windows (every family's spelling) and the RoPE types veofast does not implement."""
    extra = MOE if model_type.endswith("_moe") else {}
    config = {**AutoConfig.for_model(model_type, **SMALL, **extra).to_dict(), **changes}
    if "rope_scaling" in changes:
        config.pop("rope_parameters", None)
    with pytest.raises(ValueError, match=f"config: .*{message}"):
        DecoderConfig.from_hf_dict(config)


def test_qwen3_config_without_head_dim_is_pointed_out(caplog):
    """transformers' Qwen3Config defaults head_dim to 128; veofast derives it, as for the other families: logged."""
    config = dict(SMALL, model_type="qwen3")
    with caplog.at_level(logging.WARNING, logger="veofast.models"):
        assert DecoderConfig.from_hf_dict(config).head_dim == 16
    assert "qwen3 config without head_dim: veofast uses hidden_size / num_attention_heads = 16" in caplog.text
