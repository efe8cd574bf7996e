"""Tiny random transformers models of every supported family, for the Hugging Face interop tests.

Imported by the tests in this directory and by the distributed worker scripts (``from hf_tiny import ...``).
"""

from __future__ import annotations

import glob
import os

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

BASE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    initializer_range=0.1,
    tie_word_embeddings=False,
)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, router_aux_loss_coef=0.05)
# The smallest qwen3 override dict the config and forward audits build veofast models from (no transformers model).
TINY_QWEN3 = dict(
    model_type="qwen3",
    vocab_size=61,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
LLAMA3_ROPE = dict(
    rope_type="llama3",
    rope_theta=10000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=16,
)
YARN_ROPE = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64)

# name -> (model_type, overrides of BASE)
CASES: dict[str, tuple[str, dict]] = {
    "llama": ("llama", {}),
    "llama_tied_llama3_rope": ("llama", dict(tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE)),
    "llama_attention_bias_mqa": ("llama", dict(attention_bias=True, head_dim=24, num_key_value_heads=1)),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", dict(head_dim=32)),
    "qwen3_yarn": ("qwen3", dict(rope_parameters=YARN_ROPE)),
    "qwen3_moe_aux": ("qwen3_moe", dict(MOE, norm_topk_prob=True, output_router_logits=True)),
    "qwen3_moe_noaux": ("qwen3_moe", dict(MOE, norm_topk_prob=False, output_router_logits=False, mlp_only_layers=[1])),
    "qwen2_moe": ("qwen2_moe", dict(MOE, shared_expert_intermediate_size=40, output_router_logits=True)),
}


def hf_config(case: str, **overrides):
    """The transformers config of ``case`` (a key of CASES), with ``overrides`` on top."""
    model_type, extra = CASES[case]
    return AutoConfig.for_model(model_type, **{**BASE, **extra, **overrides})


@torch.no_grad()
def random_hf_model(config, seed: int = 0):
    """A float32 transformers model with every parameter random (norm weights around 1, biases nonzero)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.copy_(1 + 0.1 * torch.randn_like(param))
        elif name.endswith(".bias"):
            param.copy_(0.1 * torch.randn_like(param))
    return model.eval()


def save_hf_checkpoint(case: str, path: str, *, seed: int = 0, max_shard_size: str = "5GB", **overrides):
    """Write a random ``case`` model with transformers' ``save_pretrained`` to ``path``; return the model."""
    model = random_hf_model(hf_config(case, **overrides), seed)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    return model


def read_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors file ``path``, or of the safetensors files in directory ``path``, by key."""
    tensors = {}
    files = sorted(glob.glob(os.path.join(path, "*.safetensors"))) if os.path.isdir(path) else [path]
    for file in files:
        with safe_open(file, framework="pt") as f:
            tensors.update({key: f.get_tensor(key) for key in f.keys()})
    return tensors


def hf_and_veofast(case: str, path: str, *, seed: int = 0, **overrides):
    """(a random transformers ``case`` model, the veofast ``CausalLM`` loaded from its checkpoint at ``path``),
    both fp32 on the CPU, veofast with the torch reference ops."""
    from veofast.models import build_foundation_model

    hf = save_hf_checkpoint(case, path, seed=seed, **overrides)
    return hf, build_foundation_model(weights_path=str(path), init_device="cpu", ops_backend="torch")
