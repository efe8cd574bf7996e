"""How ``CausalLM`` and its MoE block behave on inputs the parity tests do not reach, each against a float64 hand
computation: the router in float64, experts that get no token, empty and all-padding micro-batches, labels of the
wrong shape, micro-batches of one or two tokens, packed documents against separate runs, ``torch.compile`` of a
block, and the seeded initialisation (meta device then materialised, the std the docstring gives)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hf_tiny import TINY_QWEN3

from veofast.models import build_foundation_model, materialize_model
from veofast.models.moe import SparseMoeBlock, load_balancing_loss

DENSE = dict(TINY_QWEN3, head_dim=8, initializer_range=0.1)
MOE = dict(
    DENSE,
    model_type="qwen2_moe",
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
    shared_expert_intermediate_size=24,
    output_router_logits=True,
)


def _model(config: dict, dtype: torch.dtype = torch.float64, **overrides):
    """A seeded ``CausalLM`` of ``config`` on the CPU with the torch reference ops, cast to ``dtype``."""
    overrides = {**config, **overrides}
    return build_foundation_model(config_overrides=overrides, init_device="cpu", ops_backend="torch").to(dtype)


def _ids(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    """``input_ids (batch, seq)``, random."""
    return torch.randint(0, DENSE["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(seed))


def _grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_router_and_aux_loss_in_float64(norm_topk_prob):
    """softmax -> top-k (-> renormalise) and the load-balancing loss of a float64 block equal a float64 hand
    computation to rounding (the softmax ran in fp32: errors of 1e-8)."""
    block = _model(MOE, norm_topk_prob=norm_topk_prob).model.layers[0].mlp
    hidden = torch.randn(13, DENSE["hidden_size"], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    topk_ids, topk_weights, stats = block.route(hidden)

    probs = torch.softmax(hidden @ block.gate.weight.T, dim=-1)
    weights, ids = probs.topk(2, dim=-1)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    counts = F.one_hot(ids, 4).sum(dim=(0, 1)).double()
    aux = 4 * torch.sum(counts / 13 * probs.sum(dim=0) / 13)
    assert torch.equal(topk_ids, ids)
    torch.testing.assert_close(topk_weights, weights, atol=1e-14, rtol=0)
    torch.testing.assert_close(load_balancing_loss(stats, 13), aux, atol=1e-14, rtol=0)


def test_expert_without_tokens_gets_zero_gradient():
    block: SparseMoeBlock = _model(MOE).model.layers[0].mlp
    with torch.no_grad():
        block.gate.weight[3] = 0.0
        block.gate.weight[3, 0] = -50.0  # with hidden[:, 0] >= 1: expert 3 is nobody's top-2
    hidden = torch.randn(9, DENSE["hidden_size"], dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    hidden[:, 0] = hidden[:, 0].abs() + 1
    out, stats = block(hidden)
    assert stats[0, 3] == 0
    out.sum().backward()
    for grad in (block.experts.gate_up_proj.grad, block.experts.down_proj.grad):
        assert torch.isfinite(grad).all() and not grad[3].any() and grad[:3].any()


@pytest.mark.parametrize("case", ["empty", "all_padding"])
def test_micro_batch_without_tokens_gives_zero_losses(case):
    """No routed token: the aux loss is 0, not 0 / 0 (NaN), and the gradients finite; an empty batch runs."""
    model = _model(MOE)
    if case == "empty":
        ids, mask = _ids(2, 0), None
    else:
        ids, mask = _ids(2, 5), torch.zeros(2, 5, dtype=torch.long)
    out = model(ids, labels=torch.full_like(ids, -100), attention_mask=mask)
    assert out.loss.item() == out.aux_loss.item() == 0.0
    out.loss.backward()
    assert all(torch.isfinite(grad).all() for grad in _grads(model).values())
    assert model(ids, attention_mask=mask).logits.shape == (*ids.shape, DENSE["vocab_size"])


def test_inconsistent_inputs_are_refused():
    """A flat ``(B * T,)`` labels vector would shift each row's first label into the previous row, a mask beside
    ``cu_seqlens`` would be ignored, and shift_labels would silently win over labels."""
    model = _model(DENSE)
    ids = _ids(2, 6)
    with pytest.raises(
        ValueError, match=r"labels must have input_ids' shape \(batch, seq_len\) = \(2, 6\), got \(12,\)"
    ):
        model(ids, labels=ids.reshape(-1))
    with pytest.raises(ValueError, match="shift_labels must have input_ids' shape"):
        model(ids, shift_labels=ids[:, :-1])
    with pytest.raises(ValueError, match="labels .* or shift_labels .*, not both"):
        model(ids, labels=ids, shift_labels=ids)
    cu_seqlens = torch.tensor([0, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match="attention_mask .* and cu_seqlens .* were both given"):
        model(ids[:1], attention_mask=torch.ones(1, 6), cu_seqlens=cu_seqlens, max_seqlen=6)


@pytest.mark.parametrize("seq_len", [1, 2])
def test_short_micro_batches_give_the_cross_entropy_of_their_logits(seq_len):
    """Rows of one or two tokens: the loss is the mean cross entropy of the logits' shifted predictions (0 with
    nothing to predict), and ``num_items_in_batch`` turns it into the sum over that count."""
    model = _model(MOE)
    ids = _ids(3, seq_len)
    logits = model(ids).logits
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
    count = 3 * (seq_len - 1)
    tol = dict(atol=1e-12, rtol=1e-7)  # the fused loss scales by 1 / count in fp32, even for float64 inputs
    torch.testing.assert_close(model(ids, labels=ids).lm_loss, expected / max(count, 1), **tol)
    torch.testing.assert_close(model(ids, labels=ids, num_items_in_batch=7).lm_loss, expected / 7, **tol)


def test_packed_documents_give_the_losses_and_gradients_of_separate_runs():
    """One packed row of documents of 5, 1 and 9 tokens against each document alone, all with the step's label
    count: the same summed loss and the same gradients (float64; the MoE aux loss is left out, it is a batch
    statistic)."""
    model = _model(MOE, output_router_logits=False)
    docs = [_ids(1, n, seed=n) for n in (5, 1, 9)]
    count = sum(doc.shape[1] - 1 for doc in docs)
    packed_labels = torch.cat([F.pad(doc[:, 1:], (1, 0), value=-100) for doc in docs], dim=1)
    position_ids = torch.cat([torch.arange(doc.shape[1]) for doc in docs])[None]
    cu_seqlens = torch.tensor([0, 5, 6, 15], dtype=torch.int32)
    packed = model(
        torch.cat(docs, dim=1),
        packed_labels,
        position_ids=position_ids,
        cu_seqlens=cu_seqlens,
        max_seqlen=9,
        num_items_in_batch=count,
    ).loss
    packed.backward()
    packed_grads = _grads(model)
    model.zero_grad()
    separate = sum(model(doc, doc, num_items_in_batch=count).loss for doc in docs)
    separate.backward()
    torch.testing.assert_close(packed, separate, atol=1e-12, rtol=0)
    for name, grad in _grads(model).items():
        torch.testing.assert_close(packed_grads[name], grad, atol=1e-12, rtol=0, msg=name)


def test_compiled_block_matches_eager():
    """``torch.compile`` (dynamo + AOT autograd, which functionalises the in-place RoPE) of a decoder layer on the
    CPU: the loss and gradients of the eager model."""
    model = _model(DENSE, torch.float32)
    ids = _ids(2, 7)

    def loss_and_grads():
        model.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        return loss.detach(), _grads(model)

    eager_loss, eager_grads = loss_and_grads()
    model.model.layers[0].compile(backend="aot_eager")
    loss, grads = loss_and_grads()
    torch.testing.assert_close(loss, eager_loss, atol=1e-6, rtol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], atol=1e-6, rtol=1e-5, msg=name)


def test_seeded_init_on_meta_then_materialised_equals_direct_init():
    """Same seed: the same weights, built directly or on the meta device and materialised; another seed differs.
    As the docstring says: normal(0, initializer_range) for matrices, ones for norm weights, zero biases."""
    config = dict(MOE, model_type="qwen2_moe", initializer_range=0.05)
    direct = build_foundation_model(config_overrides=config, init_device="cpu", seed=7)
    meta = build_foundation_model(config_overrides=config, init_device="meta")
    meta.to_empty(device="cpu")
    materialize_model(meta, seed=7)
    other = build_foundation_model(config_overrides=config, init_device="cpu", seed=8)
    for (name, param), materialised, reseeded in zip(
        direct.named_parameters(), meta.parameters(), other.parameters(), strict=True
    ):
        assert torch.equal(param, materialised), name
        if name.endswith("norm.weight"):
            assert torch.equal(param, torch.ones_like(param)), name
        elif name.endswith(".bias"):
            assert not param.any(), name
        else:
            assert not torch.equal(param, reseeded), name
            if param.numel() >= 1000:
                assert abs(param.std().item() - 0.05) < 0.005, name
    assert torch.equal(direct.inv_freq, meta.inv_freq)


def test_rope_frequencies_stay_fp32_when_the_model_is_cast():
    """``model.bfloat16()`` casts floating buffers too: the RoPE frequencies rounded to bf16 (up to 0.4% off) would
    put late positions' angles off by radians. They stay the fp32 ones, and the bf16 model's loss is the float64
    model's to bf16 precision."""
    model = _model(MOE, torch.float32)
    expected = model.inv_freq.clone()
    ids = _ids(2, 9)
    reference = model.double()(ids, labels=ids).loss
    for dtype in (torch.float16, torch.bfloat16):
        model.to(dtype)
        assert model.inv_freq.dtype == torch.float32 and torch.equal(model.inv_freq, expected), dtype
        assert model.lm_head.weight.dtype == dtype
    loss = model(ids, labels=ids).loss
    assert abs(loss.item() - reference.item()) < 2e-2
    loss.backward()
    assert all(torch.isfinite(grad).all() for grad in _grads(model).values())
