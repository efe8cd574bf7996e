"""FLOP counting for MFU: ``6 * matmul-params * tokens`` plus causal attention, as in ANCHORS.md."""

from __future__ import annotations

import torch

# Measured dense bf16 matmul rate of one H200 (../shared/ANCHORS.md); MFU is reported against it.
PEAK_TFLOPS = {"H200": 784.0}


def matmul_params(config) -> int:
    """Parameters that take part in matmuls per token: attention, MLP or the *active* experts, router, LM
    head (counted even when tied, as it is a matmul)."""
    h, d = config.hidden_size, config.head_dim
    attn = h * d * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
    total = config.vocab_size * h
    for layer in range(config.num_hidden_layers):
        total += attn
        if config.is_moe_layer(layer):
            total += config.num_experts_per_tok * 3 * h * config.moe_intermediate_size + h * config.num_experts
            total += 3 * h * config.shared_expert_intermediate_size + h * bool(config.shared_expert_intermediate_size)
        else:
            total += 3 * h * config.intermediate_size
    return total


def training_flops(config, doc_lengths: list[int]) -> float:
    """Forward + backward FLOPs of one pass over documents of ``doc_lengths`` tokens: ``6 * matmul_params`` per
    token, plus per layer and document of n tokens ``6 * heads * head_dim * n^2`` for attention (QK^T and PV take
    ``2 * 2 * n^2 * heads * head_dim`` forward over the full square, half of it under the causal mask, and the
    backward twice the forward)."""
    tokens = sum(doc_lengths)
    attention = 6 * config.num_hidden_layers * config.num_attention_heads * config.head_dim
    return 6.0 * matmul_params(config) * tokens + attention * float(sum(n * n for n in doc_lengths))


def peak_tflops() -> float | None:
    """The measured bf16 peak of this GPU, or None where we have no measurement (MFU is then not reported)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, value in PEAK_TFLOPS.items():
        if key in name:
            return value
    return None
