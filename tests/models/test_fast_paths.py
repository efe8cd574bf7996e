"""Whole models on the Triton paths (the interpreter on CPU, fp32) against the same models on the torch references:
the loss and every parameter's gradient agree. This covers how the layers chain the ops (views of projections,
qk-norm outputs rotated in place, activation checkpointing), which the per-op tests do not."""

import pytest
import torch

from veofast.distributed.parallel_state import destroy_parallel_state, init_parallel_state
from veofast.distributed.torch_parallelize import build_parallelize_model
from veofast.models import build_foundation_model

COMMON = {"vocab_size": 61, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}
MODELS = {
    "llama": {"model_type": "llama", **COMMON},  # no qk-norm: RoPE rotates the projections' head splits
    "qwen3": {"model_type": "qwen3", **COMMON},  # qk-norm: RoPE rotates the norm's outputs
    "qwen3_moe": {"model_type": "qwen3_moe", **COMMON, "num_experts": 4, "num_experts_per_tok": 2,
                  "moe_intermediate_size": 16},
}


@pytest.fixture
def parallel_state():
    destroy_parallel_state()
    yield init_parallel_state(device_type="cpu")
    destroy_parallel_state()


def _forward(config: dict, backend: str, checkpointing: bool):
    model = build_foundation_model(config_overrides=config, init_device="meta", ops_backend=backend)
    model = build_parallelize_model(model, seed=3, enable_gradient_checkpointing=checkpointing)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 61, (1, 29), generator=g)
    labels = ids.clone()
    labels[0, [0, 11]] = -100
    out = model(ids, labels, position_ids=torch.cat([torch.arange(11), torch.arange(18)])[None],
                cu_seqlens=torch.tensor([0, 11, 29], dtype=torch.int32), max_seqlen=18)
    return model, out.loss


def _loss_and_grads(config: dict, backend: str, checkpointing: bool):
    model, loss = _forward(config, backend, checkpointing)
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("checkpointing", [False, True])
def test_triton_paths_match_torch_references(parallel_state, name, checkpointing):
    loss, grads = _loss_and_grads(MODELS[name], "triton", checkpointing)
    ref_loss, ref_grads = _loss_and_grads(MODELS[name], "torch", checkpointing)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for key, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[key], rtol=1e-4, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")


def test_inplace_rope_leaves_no_view_replay(parallel_state):
    """RoPE rotates q and k in place; on autograd views of the projections that would add CopySlices and as_strided
    nodes (full-size clones, zero fills and copies in the backward). The graph must have none."""
    _, loss = _forward(MODELS["llama"], "triton", checkpointing=False)
    seen, stack, names = set(), [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    assert any("Rotate" in n for n in names), f"the in-place RoPE is not in the graph: {sorted(names)}"
    assert not names & {"CopySlices", "AsStridedBackward0"}, sorted(names)
