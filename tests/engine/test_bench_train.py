"""A tiny CPU run of ``bench/train.py``'s core: every provider but liger builds, trains a few steps, and gets a
time split; plus the kernel-name rules of the split and the run order of the plan."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench import train as bench_train  # noqa: E402
from veofast.distributed.parallel_state import destroy_parallel_state, init_parallel_state  # noqa: E402

TINY = {
    "dense": dict(
        model_type="llama",
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        tie_word_embeddings=True,
    ),
    "moe": dict(
        model_type="qwen3_moe",
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        norm_topk_prob=True,
        output_router_logits=False,
    ),
}


@pytest.fixture
def parallel_state():
    destroy_parallel_state()
    init_parallel_state(device_type="cpu")
    yield
    destroy_parallel_state()


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_providers_train_on_cpu(parallel_state, kind):
    providers = ["veofast", "veofast-torch", "transformers", "transformers+veofast"]
    rows = [
        bench_train.benchmark_provider(
            f"tiny-{kind}", TINY[kind], p, device=torch.device("cpu"), seq_len=48, warmup=1, steps=2, profile_steps=1
        )
        for p in providers
    ]
    for row in rows:
        assert "error" not in row and "profile_error" not in row, row
        assert row["tokens_per_s_per_gpu"] > 0
        assert abs(row["loss_first"] - torch.log(torch.tensor(256.0)).item()) < 1.0  # random init: about ln(V)
        assert abs(sum(row[f"{c}_pct"] for c in bench_train.SPLIT_CLASSES) - 100.0) < 1e-6
        assert row["attention_pct"] > 0 and row["loss_pct"] > 0, row
        if kind == "moe":
            assert row["moe_pct"] > 0, row


def test_kernel_name_rules():
    cases = {
        "void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits<64>>": "attention",
        "fmha_cutlassF_bf16_aligned_64x128_rf_sm80": "attention",
        "cudnn_generated_fort_native_sdpa_sm90_knob_7_64x128x64_4x1x1_kernel0_0": "attention",
        "_attn_fwd_kernel": "attention",
        "_ce_rows_kernel": "loss",
        "liger_cross_entropy_kernel": "loss",
        "void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float, float, "
        "at::native::(anonymous namespace)::LogSoftMaxForwardEpilogue>": "loss",
        "void at::native::(anonymous namespace)::nll_loss_forward_reduce_cuda_kernel_2d<float, float, long>": "loss",
        "_grouped_mm_kernel": "moe",
        "_moe_gather_kernel": "moe",
        "aten::_grouped_mm": "moe",
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1": None,
        "void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float, float, "
        "at::native::(anonymous namespace)::SoftMaxForwardEpilogue>": None,
        "_rms_norm_fwd_kernel": None,
    }
    for name, expected in cases.items():
        assert bench_train.classify_name(name) == expected, name


def test_plan_runs_liger_last_per_family():
    args = argparse.Namespace(
        providers=",".join(bench_train.PROVIDERS), models="dense,moe", moe_layers="4", quick=True, fsdp=False
    )
    plan = bench_train.build_plan(args)
    for family in ("llama-3.2-1b", "qwen3-30b-a3b-4l"):
        names = [p for m, _, p in plan if m == family]
        assert sorted(names) == sorted(bench_train.PROVIDERS)
        others = [names.index(n) for n in names if n.startswith("transformers") and n != "transformers+liger"]
        assert names.index("transformers+liger") > max(others)
    assert [p for m, _, p in plan if m == "qwen3-30b-a3b-4l"][-1] == "veofast-torch"  # --quick: the slowest last
