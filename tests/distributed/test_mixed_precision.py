"""Mixed precision by per-unit casts (veofast.distributed.mixed_precision): the model computes exactly what the same
model held in bf16 computes, its gradients are those bf16 gradients in fp32, and outside a forward it holds its
fp32 parameters (also after a forward that raised). Tiny models on CPU, torch reference ops, bf16 compute."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from veofast.distributed.mixed_precision import cast_parameters_for_compute
from veofast.distributed.parallel_state import destroy_parallel_state, init_parallel_state
from veofast.distributed.torch_parallelize import build_parallelize_model
from veofast.models.auto import build_foundation_model

TINY = {
    "llama": {"model_type": "llama", "vocab_size": 97, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "tie_word_embeddings": True},
    "qwen3_moe": {"model_type": "qwen3_moe", "vocab_size": 97, "hidden_size": 32, "intermediate_size": 64,
                  "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "num_experts": 4,
                  "num_experts_per_tok": 2, "moe_intermediate_size": 16, "output_router_logits": True,
                  "router_aux_loss_coef": 0.1},
}


def _batch(vocab: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    lengths = [5, 11, 1, 7]
    ids = torch.randint(0, vocab, (1, sum(lengths)), generator=gen)
    labels = ids.clone()
    starts = torch.tensor([0, 5, 16, 17])
    labels[0, starts] = -100
    cu = torch.tensor([0, 5, 16, 17, 24], dtype=torch.int32)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    return {"input_ids": ids, "labels": labels, "position_ids": positions, "cu_seqlens": cu, "max_seqlen": 11}


def _loss(model: nn.Module, batch: dict) -> torch.Tensor:
    out = model(**batch)
    return out.lm_loss + (out.aux_loss if out.aux_loss is not None else 0.0)


def _models(model_type: str, checkpointing: bool):
    model = build_foundation_model(config_overrides=TINY[model_type], init_device="cpu", ops_backend="torch")
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    in_bf16 = copy.deepcopy(model)
    for param in in_bf16.parameters():  # parameters only: buffers (the RoPE frequencies) stay fp32, as with FSDP
        param.data = param.data.to(torch.bfloat16)
    cast_parameters_for_compute(model, list(model.model.layers), torch.bfloat16)
    return model, in_bf16


@pytest.mark.parametrize("model_type", ["llama", "qwen3_moe"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_casts_compute_what_the_bf16_model_computes(model_type, checkpointing):
    model, in_bf16 = _models(model_type, checkpointing)
    batch = _batch(model.config.vocab_size)
    loss = _loss(model, batch)
    loss_bf16 = _loss(in_bf16, batch)
    assert loss.dtype == loss_bf16.dtype and torch.equal(loss, loss_bf16)
    loss.backward()
    loss_bf16.backward()
    bf16_params = dict(in_bf16.named_parameters())
    for name, param in model.named_parameters():
        assert isinstance(param, nn.Parameter) and param.dtype == torch.float32, name
        assert param.grad is not None and param.grad.dtype == torch.float32, name
        assert torch.equal(param.grad, bf16_params[name].grad.float()), name


def test_model_holds_fp32_parameters_outside_forward_and_after_an_error():
    model, _ = _models("llama", False)
    before = {name: p for name, p in model.named_parameters()}
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied: one cast, shared
    batch = _batch(model.config.vocab_size)
    with torch.no_grad():
        model(**batch)
    bad = dict(batch, cu_seqlens=torch.tensor([0, 3], dtype=torch.int32))  # does not cover the tokens
    with pytest.raises(ValueError):
        model(**bad)
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)
    assert all(v.dtype == torch.float32 for v in model.state_dict().values() if v.is_floating_point())


def test_frozen_parameters_get_no_gradient_and_cost_no_weight_gradient():
    """Frozen parameters are cast outside autograd (their casts do not require grad, so no weight gradient is
    computed for them) or, in the projections that cast their own weights, skipped by their backward; the trained
    parameters still get the bf16 model's gradients."""
    model, in_bf16 = _models("llama", False)
    for m in (model, in_bf16):
        m.model.layers[0].self_attn.requires_grad_(False)
        m.model.layers[0].input_layernorm.requires_grad_(False)
    seen = []
    layer = model.model.layers[0]
    norm = layer.input_layernorm
    handle = layer.self_attn.register_forward_pre_hook(
        lambda module, args: seen.append((norm.weight.dtype, norm.weight.requires_grad, module.q_proj.compute_dtype))
    )
    batch = _batch(model.config.vocab_size)
    _loss(model, batch).backward()
    _loss(in_bf16, batch).backward()
    handle.remove()
    assert seen == [(torch.bfloat16, False, torch.bfloat16)]
    assert layer.self_attn.q_proj.compute_dtype is None  # set for the unit's forward only
    bf16_params = dict(in_bf16.named_parameters())
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert torch.equal(param.grad, bf16_params[name].grad.float()), name
        else:
            assert param.grad is None, name


def test_parameter_shared_between_units_is_refused():
    model = build_foundation_model(config_overrides=TINY["llama"], init_device="cpu", ops_backend="torch")
    layers = model.model.layers
    layers[1].mlp.up_proj.weight = layers[0].mlp.up_proj.weight
    with pytest.raises(ValueError, match="shared between two units"):
        cast_parameters_for_compute(model, list(layers), torch.bfloat16)


def test_one_rank_training_builds_a_plain_module():
    """One rank: no FSDP wrapping (it would only copy); the parameters are plain tensors on the device."""
    destroy_parallel_state()
    init_parallel_state(device_type="cpu")
    try:
        model = build_foundation_model(config_overrides=TINY["qwen3_moe"], ops_backend="torch")
        model = build_parallelize_model(model, init_device="meta", seed=0)
        assert not isinstance(model, FSDPModule)
        assert not any(isinstance(p, DTensor) or p.is_meta for p in model.parameters())
    finally:
        destroy_parallel_state()


@pytest.mark.gpu
def test_gpu_gradient_casts_match_the_bf16_gradients():
    """On CUDA the fp32 gradients of parameters with at least a million elements come from the Triton cast, the
    smaller ones from torch's copy: both the same bits as the bf16 model's gradients in fp32."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 1024), nn.GELU(), nn.Linear(1024, 8)).cuda()
    in_bf16 = copy.deepcopy(model).to(torch.bfloat16)
    cast_parameters_for_compute(model, [model[0]], torch.bfloat16)
    x = torch.randn(64, 1024, device="cuda", dtype=torch.bfloat16)
    model(x).float().square().sum().backward()
    in_bf16(x).float().square().sum().backward()
    for param, ref in zip(model.parameters(), in_bf16.parameters(), strict=True):
        assert param.dtype == param.grad.dtype == torch.float32
        assert torch.equal(param.grad, ref.grad.float())
