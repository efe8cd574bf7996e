"""The training step on one process: non-finite steps are skipped, activation checkpointing changes nothing,
the profiler writes a trace."""

import os

import pytest
import torch

from veofast.distributed.parallel_state import destroy_parallel_state, init_parallel_state
from veofast.distributed.torch_parallelize import build_parallelize_model
from veofast.models import build_foundation_model
from veofast.optim import build_lr_scheduler, build_optimizer
from veofast.train_step import train_step
from veofast.utils.helper import create_profiler

TINY_MOE = {"model_type": "qwen3_moe", "vocab_size": 61, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "num_experts": 4,
            "num_experts_per_tok": 2, "moe_intermediate_size": 16, "output_router_logits": True}


@pytest.fixture
def parallel_state():
    destroy_parallel_state()
    ps = init_parallel_state(device_type="cpu")
    yield ps
    destroy_parallel_state()


def micro_batch(seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 61, (1, 30), generator=g)
    labels = ids.clone()
    labels[0, [0, 12]] = -100
    positions = torch.cat([torch.arange(12), torch.arange(18)])[None]
    return {"input_ids": ids, "labels": labels, "position_ids": positions,
            "cu_seqlens": torch.tensor([0, 12, 30], dtype=torch.int32), "max_seqlen": 18,
            "num_label_tokens": int((labels != -100).sum())}


def merge(a, b):
    """Two packed micro-batches as one (their documents side by side)."""
    merged = {key: torch.cat([a[key], b[key]], dim=1) for key in ("input_ids", "labels", "position_ids")}
    merged["cu_seqlens"] = torch.cat([a["cu_seqlens"], b["cu_seqlens"][1:] + a["cu_seqlens"][-1]])
    merged["max_seqlen"] = max(a["max_seqlen"], b["max_seqlen"])
    merged["num_label_tokens"] = a["num_label_tokens"] + b["num_label_tokens"]
    return merged


class RecordingSGD(torch.optim.SGD):
    """SGD that keeps a copy of the gradients its last step applied."""

    def step(self, closure=None):
        self.applied = [p.grad.clone() for group in self.param_groups for p in group["params"]]
        return super().step(closure)


def build(ps, overrides=None, **kwargs):
    model = build_foundation_model(config_overrides={**TINY_MOE, **(overrides or {})}, init_device="meta",
                                   ops_backend="torch")
    config = model.config
    model = build_parallelize_model(model, seed=3, **kwargs)
    opt = build_optimizer(model, lr=1e-2)
    return model, config, opt, build_lr_scheduler(opt, train_steps=5, lr_decay_style="constant")


def test_non_finite_step_is_skipped(parallel_state):
    model, config, opt, sched = build(parallel_state)
    ok = train_step(model, [micro_batch(0)], opt, sched, config=config, ps=parallel_state, max_grad_norm=1.0)
    assert not ok.skipped and ok.label_tokens == 28 and ok.tokens == 30
    before = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        model.model.embed_tokens.weight[3].fill_(float("nan"))  # one rank: plain tensors, no FSDP
    batch = micro_batch(1)
    batch["input_ids"][0, 5] = 3
    bad = train_step(model, [batch], opt, sched, config=config, ps=parallel_state, max_grad_norm=1.0)
    assert bad.skipped
    after = list(model.parameters())
    changed = [not torch.equal(a, b) for a, b in zip(before, after)]
    assert changed == [n == "model.embed_tokens.weight" for n, _ in model.named_parameters()]  # only our poke
    assert all(p.grad is None for p in model.parameters())


def test_activation_checkpointing_gives_same_step(parallel_state):
    results = []
    for checkpointing in (False, True):
        model, config, opt, sched = build(parallel_state, enable_gradient_checkpointing=checkpointing)
        steps = [train_step(model, [micro_batch(s)], opt, sched, config=config, ps=parallel_state, max_grad_norm=1.0)
                 for s in range(2)]
        results.append([(r.loss, r.grad_norm) for r in steps])
    assert results[0] == pytest.approx(results[1], rel=1e-5)


def test_profiler_writes_trace(tmp_path):
    profiler = create_profiler(start_step=2, end_step=3, trace_dir=str(tmp_path))
    profiler.start()
    for _ in range(3):
        torch.randn(64, 64) @ torch.randn(64, 64)
        profiler.step()
    profiler.stop()
    assert os.path.getsize(tmp_path / "trace_rank0.json") > 0
    with pytest.raises(ValueError, match="start_step"):
        create_profiler(start_step=3, end_step=2, trace_dir=str(tmp_path))


def test_clipping_inside_the_optimizer_matches_clipping_the_gradients(parallel_state):
    """veofast's AdamW takes the clipping factor into its update (Triton kernel, interpreted here); torch's AdamW
    after clip_grad_norm scaled the gradients: the same training."""
    model, config, opt, sched = build(parallel_state)
    opt = build_optimizer(model, lr=1e-2, backend="triton")
    sched = build_lr_scheduler(opt, train_steps=5, lr_decay_style="constant")
    twin, _, _, _ = build(parallel_state)
    twin.load_state_dict(model.state_dict())
    ref = torch.optim.AdamW([p for p in twin.parameters()], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0)
    ref_sched = build_lr_scheduler(ref, train_steps=5, lr_decay_style="constant")
    for seed in range(2):
        ours = train_step(model, [micro_batch(seed)], opt, sched, config=config, ps=parallel_state, max_grad_norm=0.05)
        theirs = train_step(twin, [micro_batch(seed)], ref, ref_sched, config=config, ps=parallel_state,
                            max_grad_norm=0.05)
        assert ours.grad_norm > 0.05 and ours.grad_norm == pytest.approx(theirs.grad_norm, rel=1e-5)
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("max_grad_norm", [0.0, 0.05])
def test_micro_batches_accumulate_like_one(parallel_state, max_grad_norm):
    """The step's gradient is sum(token losses) / the step's label-token count: two micro-batches and one without a
    label give the gradient of one micro-batch holding their documents (MoE without the per-micro-batch aux loss).
    The reported norm is the one before clipping; max_grad_norm <= 0 clips nothing."""
    empty, short = micro_batch(2), micro_batch(1)
    empty["labels"][:] = -100
    empty["num_label_tokens"] = 0
    short["labels"][0, 20:] = -100  # fewer labels than the other micro-batch: a per-micro-batch mean would differ
    short["num_label_tokens"] = 18
    steps = {"split": [micro_batch(0), empty, short], "merged": [merge(micro_batch(0), short)]}
    applied = {}
    for name, batches in steps.items():
        model, config, _, _ = build(parallel_state, overrides={"output_router_logits": False})
        opt = RecordingSGD(model.parameters(), lr=1e-3)
        sched = build_lr_scheduler(opt, train_steps=5, lr_decay_style="constant")
        result = train_step(model, batches, opt, sched, config=config, ps=parallel_state, max_grad_norm=max_grad_norm)
        assert result.label_tokens == 46 and not result.skipped
        applied[name] = opt.applied
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in opt.applied]))
        assert norm.item() == pytest.approx(max_grad_norm if max_grad_norm > 0 else result.grad_norm, rel=1e-4)
        assert result.grad_norm > 0.05
    for split, merged in zip(applied["split"], applied["merged"], strict=True):
        torch.testing.assert_close(split, merged, rtol=1e-4, atol=1e-6)


def test_unknown_basic_module_is_named_on_one_rank(parallel_state):
    """One CPU rank wraps no unit, yet a ``basic_modules`` class the model lacks is still an error, not ignored."""
    model = build_foundation_model(config_overrides=TINY_MOE, init_device="meta", ops_backend="torch")
    with pytest.raises(ValueError, match=r"basic_modules: no module class named \['DecoderLayr'\]"):
        build_parallelize_model(model, basic_modules=["DecoderLayr"])
