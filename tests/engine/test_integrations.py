"""``veofast.integrations.transformers``: a transformers model with veofast's ops swapped in computes the same
logits, loss and gradients as the untouched model (fp32, CPU), packs documents, and keeps its parameters."""

from __future__ import annotations

import copy
import types

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from veofast.integrations.transformers import (
    ATTENTION_NAME,
    VeofastExperts,
    VeofastRMSNorm,
    VeofastSwiGLUMLP,
    apply_veofast_ops,
    causal_lm_loss,
)

BASE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    initializer_range=0.1,
)
CASES = {
    "llama": ("llama", dict(tie_word_embeddings=True)),
    "qwen3_moe": (
        "qwen3_moe",
        dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, head_dim=16, output_router_logits=True),
    ),
    "qwen2_moe": (  # a shared expert beside the routed ones
        "qwen2_moe",
        dict(
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=40,
            output_router_logits=True,
        ),
    ),
}
TOL = 1e-4


def _pair(case: str, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """(the transformers model with sdpa, a deep copy with veofast's ops swapped in), fp32, train mode."""
    model_type, extra = CASES[case]
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **BASE, **extra)
    ref = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32).train()
    with torch.no_grad():  # norm weights away from 1, so a lost weight would show
        for name, p in ref.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    swapped = copy.deepcopy(ref)
    apply_veofast_ops(swapped)
    return ref, swapped


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_logits_loss_and_grads(case):
    ref, swapped = _pair(case)
    assert swapped.config._attn_implementation == ATTENTION_NAME
    kinds = {type(m) for m in swapped.modules()}
    assert VeofastRMSNorm in kinds
    assert (VeofastExperts if case.endswith("_moe") else VeofastSwiGLUMLP) in kinds
    torch.manual_seed(1)
    input_ids = torch.randint(0, BASE["vocab_size"], (2, 13))
    labels = input_ids.clone()
    labels[0, :4] = -100

    with torch.no_grad():
        assert _max_diff(ref(input_ids=input_ids).logits, swapped(input_ids=input_ids).logits) <= TOL

    ref_loss = ref(input_ids=input_ids, labels=labels).loss
    loss = causal_lm_loss(swapped, input_ids, labels)
    assert abs(ref_loss.item() - loss.item()) <= TOL
    ref_loss.backward()
    loss.backward()
    ref_params, params = dict(ref.named_parameters()), dict(swapped.named_parameters())
    assert ref_params.keys() == params.keys()
    for name, p in ref_params.items():
        assert params[name].grad is not None, name
        assert _max_diff(p.grad, params[name].grad) <= TOL, name


def test_parameters_are_shared_not_copied():
    _, swapped = _pair("qwen3_moe")
    before = {name: id(p) for name, p in swapped.named_parameters()}
    keys = list(swapped.state_dict())
    apply_veofast_ops(swapped)  # a second call finds nothing left to replace and changes nothing
    assert {name: id(p) for name, p in swapped.named_parameters()} == before
    assert list(swapped.state_dict()) == keys


def test_packed_documents_attend_only_within_themselves():
    ref, swapped = _pair("llama")
    torch.manual_seed(2)
    lengths = [5, 8]
    input_ids = torch.randint(0, BASE["vocab_size"], (1, sum(lengths)))
    position_ids = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    cu_seqlens = torch.tensor([0, 5, 13], dtype=torch.int32)
    with torch.no_grad():
        expected = torch.cat([ref(input_ids=ids).logits for ids in input_ids.split(lengths, dim=1)], dim=1)
        packed = swapped(
            input_ids=input_ids,
            position_ids=position_ids,
            cu_seq_lens_q=cu_seqlens,
            cu_seq_lens_k=cu_seqlens,
            max_length_q=8,
            max_length_k=8,
        ).logits
        from_positions = swapped(input_ids=input_ids, position_ids=position_ids).logits
    assert _max_diff(packed, expected) <= TOL
    assert _max_diff(from_positions, expected) <= TOL

    labels = input_ids.clone()
    labels[0, 5] = -100  # the second document's first token is not predicted from the first document
    loss = causal_lm_loss(swapped, input_ids, labels, position_ids=position_ids, cu_seqlens=cu_seqlens, max_seqlen=8)
    with torch.no_grad():
        docs = zip(input_ids.split(lengths, dim=1), lengths)
        doc_sums = [ref(input_ids=ids, labels=ids).loss * (n - 1) for ids, n in docs]
    assert abs(loss.item() - (sum(doc_sums) / (sum(lengths) - 2)).item()) <= TOL


def test_errors():
    fake = nn.Module()
    fake.config = types.SimpleNamespace(model_type="gpt2")
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        apply_veofast_ops(fake)
    _, swapped = _pair("llama")
    input_ids = torch.randint(0, BASE["vocab_size"], (2, 6))
    left_padded = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with pytest.raises(ValueError, match="right padding"):
        swapped(input_ids=input_ids, attention_mask=left_padded)
    with pytest.raises(ValueError, match="exactly one of labels"):
        causal_lm_loss(swapped, input_ids)
