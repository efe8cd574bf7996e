"""``veofast.integrations.transformers``: a transformers model with veofast's ops swapped in computes the same
logits, loss and gradients as the untouched model (fp32, CPU; the GPU-marked cases run the Triton kernels), packs
documents, takes padding anywhere, generates with a KV cache, keeps its parameters, and refuses what it cannot do."""

from __future__ import annotations

import copy
import types

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

from veofast.integrations.transformers import (
    ATTENTION_NAME,
    VeofastExperts,
    VeofastRMSNorm,
    VeofastSwiGLUMLP,
    _padding_mask,
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
    "qwen2": ("qwen2", dict(num_attention_heads=8, num_key_value_heads=2)),  # q/k/v biases, GQA 4:1
    "qwen3": ("qwen3", dict(head_dim=24, num_key_value_heads=1)),  # head_dim != hidden / heads, q/k norms
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
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]  # cuda: the Triton attention kernels


def _model(case: str, seed: int = 0, **overrides) -> nn.Module:
    """The transformers model of ``CASES[case]`` (config entries replaced by ``overrides``) with sdpa, fp32, train
    mode."""
    model_type, extra = CASES[case]
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **{**BASE, **extra, **overrides})
    ref = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32).train()
    with torch.no_grad():  # norm weights away from 1, so a lost weight would show
        for name, p in ref.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return ref


def _pair(case: str, seed: int = 0, **overrides) -> tuple[nn.Module, nn.Module]:
    """(``_model(case, seed, **overrides)``, a deep copy with veofast's ops swapped in)."""
    ref = _model(case, seed, **overrides)
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
    model = _model("qwen3_moe")
    counts = apply_veofast_ops(model)
    assert counts == {"norms": 2 * 4 + 1, "mlp": 0, "experts": 2, "attention": 2}  # 4 norms a layer: q/k norms
    before = {name: id(p) for name, p in model.named_parameters()}
    keys = list(model.state_dict())
    # a second call keeps the swapped modules and their Parameters, and gives them its backend
    assert apply_veofast_ops(model, backend="torch") == counts
    assert {name: id(p) for name, p in model.named_parameters()} == before
    assert list(model.state_dict()) == keys
    assert {m.backend for m in model.modules() if isinstance(m, (VeofastRMSNorm, VeofastExperts))} == {"torch"}


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
    with pytest.raises(ValueError, match="must be a 2-D"):  # a 4-D mask reaches the attention function as it is
        swapped(input_ids=input_ids, attention_mask=torch.ones(2, 1, 6, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="exactly one of labels"):
        causal_lm_loss(swapped, input_ids)


def _valid_max_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    """Max |a - b| over the positions where ``mask (B, T)`` is 1; a, b: (B, T, V)."""
    return _max_diff(a[mask.bool()], b[mask.bool()])


@pytest.mark.parametrize("device", DEVICES)
def test_any_padding_gives_the_untouched_models_outputs(device):
    """Left, right and inner padding and a fully padded row: logits at the real tokens, loss and grads as the
    untouched model's; no NaN anywhere (padded positions get zero attention output)."""
    ref, swapped = (m.to(device) for m in _pair("llama"))
    torch.manual_seed(3)
    input_ids = torch.randint(0, BASE["vocab_size"], (4, 9), device=device)
    mask = torch.ones_like(input_ids)
    mask[0, :4] = 0  # left
    mask[1, 6:] = 0  # right
    mask[2, 3:5] = 0  # inner
    mask[3] = 0  # a row of padding only
    with torch.no_grad():
        logits = swapped(input_ids=input_ids, attention_mask=mask).logits
        assert not logits.isnan().any()
        assert _valid_max_diff(ref(input_ids=input_ids, attention_mask=mask).logits, logits, mask) <= TOL

    predicted_from_pad = torch.cat([mask[:, :1], mask[:, :-1]], dim=1) == 0  # a pad's logits are no one's
    labels = input_ids.masked_fill((mask == 0) | predicted_from_pad, -100)
    ref_loss = ref(input_ids=input_ids, attention_mask=mask, labels=labels).loss
    loss = causal_lm_loss(swapped, input_ids, labels, attention_mask=mask)
    assert abs(ref_loss.item() - loss.item()) <= TOL
    ref_loss.backward()
    loss.backward()
    params = dict(swapped.named_parameters())
    for name, p in ref.named_parameters():
        assert _max_diff(p.grad, params[name].grad) <= TOL, name
    # the padding-only row alone: no label at all gives loss 0, not NaN (transformers' own loss is NaN there)
    assert causal_lm_loss(swapped, input_ids[3:], labels[3:], attention_mask=mask[3:]).item() == 0.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_generate_with_kv_cache_matches_the_untouched_model(cache, device):
    """Greedy decoding of a left-padded batch: one query against the cached keys per step (bottom-right causal
    alignment), with transformers' dynamic cache and a static one (whose key slots past the tokens seen are empty)."""
    # transformers' own generate fails with output_router_logits
    ref, swapped = (m.to(device).eval() for m in _pair("qwen3_moe", output_router_logits=False))
    torch.manual_seed(4)
    input_ids = torch.randint(1, BASE["vocab_size"], (2, 7), device=device)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]], device=device)
    kwargs = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0, cache_implementation=cache)
    kwargs.update(output_logits=True, return_dict_in_generate=True)
    expected, got = ref.generate(input_ids, **kwargs), swapped.generate(input_ids, **kwargs)
    assert torch.equal(expected.sequences, got.sequences)
    assert max(_max_diff(a, b) for a, b in zip(expected.logits, got.logits, strict=True)) <= TOL


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated")  # renamed `cache` after transformers 5.17
def test_chunked_prefill_with_a_cache_sees_the_cached_tokens():
    """A second chunk of several queries against a longer cached key sequence (q_len < k_len) with a padded row."""
    ref, swapped = _pair("llama")
    ref.eval(), swapped.eval()
    torch.manual_seed(5)
    input_ids = torch.randint(0, BASE["vocab_size"], (2, 9))
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        expected = ref(input_ids=input_ids, attention_mask=mask).logits
        cache = DynamicCache(config=swapped.config)
        first = swapped(input_ids=input_ids[:, :5], attention_mask=mask[:, :5], past_key_values=cache).logits
        second = swapped(input_ids=input_ids[:, 5:], attention_mask=mask, past_key_values=cache).logits
    assert _valid_max_diff(expected, torch.cat([first, second], dim=1), mask) <= TOL


def test_inference_mode():
    """Inference tensors have no version counter: the document layout must not need one."""
    ref, swapped = _pair("llama")
    input_ids = torch.randint(0, BASE["vocab_size"], (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]])
    with torch.inference_mode():
        for kwargs in ({}, {"attention_mask": mask}):
            expected = ref(input_ids=input_ids, **kwargs).logits
            assert _valid_max_diff(expected, swapped(input_ids=input_ids, **kwargs).logits, mask) <= TOL


def test_unsupported_settings_raise_and_leave_the_model_untouched():
    """Settings veofast cannot honour are errors naming them, raised before any module is swapped."""
    for case, overrides, match in (
        ("llama", dict(attention_dropout=0.1), "attention_dropout=0.1"),
        ("qwen3_moe", dict(hidden_act="gelu"), "hidden_act='gelu'"),  # the experts op is SiLU-gated
    ):
        model = _model(case, **overrides)
        before = [type(m) for m in model.modules()]
        with pytest.raises(ValueError, match=match):
            apply_veofast_ops(model)
        assert [type(m) for m in model.modules()] == before
        assert model.config._attn_implementation == "sdpa"
    assert apply_veofast_ops(_model("qwen3_moe", hidden_act="gelu"), mlp=False, experts=False)["norms"] > 0

    swapped = _model("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=0)
    apply_veofast_ops(swapped)
    with pytest.raises(ValueError, match="sliding_window=4"):
        swapped(input_ids=torch.zeros(1, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="has no config"):
        apply_veofast_ops(nn.Sequential(_model("llama")))


def test_mask_function_finds_the_filled_cache_slots():
    """The mask function gives None when every key slot holds a token, else an all-True mask over the filled slots
    (a static cache), from ``q_offset`` / ``q_length`` or from the ``cache_position`` of other transformers releases."""
    assert _padding_mask(batch_size=2, kv_length=5, q_length=5) is None
    assert _padding_mask(batch_size=2, kv_length=5, q_length=1, q_offset=4) is None
    expected = torch.ones(2, 4, dtype=torch.bool)
    assert torch.equal(_padding_mask(batch_size=2, kv_length=9, q_length=1, q_offset=torch.tensor(3)), expected)
    assert torch.equal(_padding_mask(batch_size=2, kv_length=9, cache_position=torch.tensor([3])), expected)
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    assert _padding_mask(batch_size=2, kv_length=9, q_length=3, attention_mask=mask) is mask
