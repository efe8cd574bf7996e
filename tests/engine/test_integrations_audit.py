"""``veofast.integrations.transformers`` on paths that ML engineers commonly take beyond the main tests: asking for
the attention weights, calling ``causal_lm_loss`` with ``return_dict=False`` on an MoE model, and calling
``apply_veofast_ops`` again with some kinds turned off (fp32, CPU; tiny random models)."""

from __future__ import annotations

import copy

import pytest
import torch
from test_integrations import BASE as TINY
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from veofast.integrations.transformers import apply_veofast_ops, causal_lm_loss

MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, head_dim=16, output_router_logits=True)
TOL = 1e-4


def _pair(model_type: str, **overrides) -> tuple[nn.Module, nn.Module]:
    """(a tiny fp32 ``model_type`` causal LM with sdpa attention, a deep copy with veofast's ops swapped in)."""
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **{**TINY, **overrides})
    ref = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    swapped = copy.deepcopy(ref)
    apply_veofast_ops(swapped)
    return ref, swapped


def test_output_attentions_is_refused_not_an_empty_tuple():
    """The fused kernel has no attention weights: asking for them raises, naming the setting (it used to give an empty
    tuple, silently), and switching the model to eager attention gives the untouched model's weights."""
    ref, swapped = _pair("llama")
    input_ids = torch.randint(0, TINY["vocab_size"], (2, 7))
    with pytest.raises(ValueError, match="output_attentions=True is not supported"):
        swapped(input_ids=input_ids, output_attentions=True)
    ref.set_attn_implementation("eager")
    swapped.set_attn_implementation("eager")
    with torch.no_grad():
        expected = ref(input_ids=input_ids, output_attentions=True).attentions
        got = swapped(input_ids=input_ids, output_attentions=True).attentions
    assert len(got) == len(expected) == TINY["num_hidden_layers"]
    assert max((a - b).abs().max().item() for a, b in zip(expected, got, strict=True)) <= TOL


def test_causal_lm_loss_finds_the_router_logits_with_return_dict_false():
    """``return_dict=False`` among the model kwargs (or in the config) made the base model return a tuple, where the
    router logits for the MoE aux loss were not found by name: a misleading error instead of the loss."""
    ref, swapped = _pair("qwen3_moe", **MOE)
    input_ids = torch.randint(0, TINY["vocab_size"], (2, 7))
    expected = ref(input_ids=input_ids, labels=input_ids).loss
    loss = causal_lm_loss(swapped, input_ids, input_ids, return_dict=False)
    assert abs(loss.item() - expected.item()) <= TOL


def test_a_second_call_counts_the_earlier_swaps():
    """The counts are of the modules that run veofast's ops after the call: a second call with every kind turned off
    keeps the earlier swaps and counts them (it used to report zeros)."""
    _, swapped = _pair("qwen2_moe", **MOE, shared_expert_intermediate_size=40)
    counts = apply_veofast_ops(swapped)
    assert counts == {"norms": 2 * 2 + 1, "mlp": 2, "experts": 2, "attention": 2}  # mlp: the shared experts
    off = dict(norms=False, mlp=False, experts=False, attention=False)
    assert apply_veofast_ops(swapped, backend="torch", **off) == counts
    assert all(getattr(m, "backend", "auto") == "auto" for m in swapped.modules())  # kinds turned off keep theirs
