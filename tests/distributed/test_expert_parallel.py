"""Expert parallelism on CPU/gloo: EP=2 gives the losses, aux losses and gradient norms of EP=1 on one rank;
the dispatcher matches the reference with empty experts and idle ranks; bad expert counts fail clearly; HF
checkpoints load into and save out of EP models exactly.

Tolerance of the training comparison: rel 2e-5 in fp32 (the EP path sums the same products in another order:
permute -> grouped GEMMs -> unpermute instead of the reference's per-expert loop, and the gradient reductions
run over other groups). The dispatcher comparison runs in float64 on the torch path (abs 1e-12) and in float32
on the Triton path (abs 1e-5; the kernels under the interpreter on CPU).
"""

import json

import pytest
from dist_launch import torchrun

TRAIN_WORKER = "tests/distributed/workers/train_steps_worker.py"
EP_WORKER = "tests/distributed/workers/ep_worker.py"
CASES = ("random", "idle_rank", "empty_experts", "all_remote", "one_local_expert")
DISPATCHES = ("alltoall", "allgather")


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    out = tmp_path_factory.mktemp("ep1") / "out.json"
    torchrun(TRAIN_WORKER, str(out), "qwen3_moe", nproc=1)
    return json.loads(out.read_text())


def run_ep_worker(tmp_path, nproc):
    out = tmp_path / "report.json"
    torchrun(EP_WORKER, str(out), str(tmp_path), nproc=nproc)
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return run_ep_worker(tmp_path_factory.mktemp("ep2"), 2)


def assert_same_steps(a, b, rel=2e-5):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x["label_tokens"] == y["label_tokens"]
        for key in ("loss", "aux_loss", "grad_norm"):
            assert x[key] == pytest.approx(y[key], rel=rel), (key, a, b)


def check_errors(report):
    assert len(report["errors"]) == 2, report["errors"]
    for message in report["errors"]:
        assert "num_experts=3" in message and "not divisible by ep_size=2" in message, report["errors"]


def check_dispatch(report):
    # float64 on the torch path; float32 on the Triton path (values and gradients of order 1)
    assert set(report["dispatch"]) == {
        f"{dispatch}:{backend}:{case}" for dispatch in DISPATCHES for backend in ("torch", "triton") for case in CASES
    }
    for key, errors in report["dispatch"].items():
        assert max(errors.values()) < (1e-12 if ":torch:" in key else 1e-5), (key, errors)


def check_bad_ids(report, world_size):
    # every rank raised, also the EP rank-0 ranks whose own ids were fine: no rank went on into the row exchange
    assert set(report["bad_ids"]) == set(DISPATCHES)
    for messages in report["bad_ids"].values():
        assert len(messages) == world_size, report["bad_ids"]
        for message in messages:
            assert "topk_ids outside [0, num_experts=4)" in message and "EP rank(s) [1]" in message, messages


def check_strategies(report):
    # 4 experts top-2 over 2 ranks: 5 of 6 expert pairs touch the other rank (83%); E=128 top-8: 99.6%;
    # E=64 top-1: 50% -> all-to-all
    strategies = report["strategies"]
    assert strategies["auto_e4_top2"] == strategies["auto_e128_top8"] == "allgather", strategies
    assert strategies["auto_e64_top1"] == "alltoall", strategies
    assert "dispatch must be one of" in strategies["bad_mode"] and "'ring'" in strategies["bad_mode"], strategies


def check_hf(report, placements):
    for tag, hf in report["hf"].items():
        assert hf["same_params"] and hf["same_files"], (tag, hf)
        assert hf["placements"] == placements[tag], (tag, hf)


def test_ep2_on_two_ranks_matches_one_rank(two_ranks, one_rank):
    assert_same_steps(one_rank, two_ranks["train"])


def test_triton_adamw_on_expert_slices_matches_one_rank(tmp_path, one_rank):
    """EP=2: the Triton AdamW (interpreted) steps the EP-sliced expert weights and the FSDP2 shards as torch's AdamW
    steps the whole model on one rank."""
    out = tmp_path / "out.json"
    torchrun(TRAIN_WORKER, str(out), "qwen3_moe", "ep=2", "opt=triton", nproc=2)
    assert_same_steps(one_rank, json.loads(out.read_text()))


def test_ep2_alltoall_dispatch_matches_one_rank(tmp_path, one_rank):
    """The training steps above take the all-gather dispatch (4 experts, top-2 over 2 ranks); the all-to-all one
    (larger EP groups) must train the same."""
    out = tmp_path / "out.json"
    torchrun(TRAIN_WORKER, str(out), "qwen3_moe", "ep=2", "dispatch=alltoall", nproc=2)
    assert_same_steps(one_rank, json.loads(out.read_text()))


def test_indivisible_experts_fail_before_any_collective(two_ranks):
    # raised on rank 0 alone: a collective before the check would have hung the worker
    check_errors(two_ranks)


def test_dispatch_with_experts_and_ranks_without_tokens(two_ranks):
    check_dispatch(two_ranks)


def test_out_of_range_expert_ids_fail_on_every_rank(two_ranks):
    check_bad_ids(two_ranks, 2)


def test_auto_dispatch_gathers_when_tokens_need_every_rank(two_ranks):
    check_strategies(two_ranks)


def test_hf_checkpoint_round_trip_under_ep(two_ranks):
    # ep_fsdp has size 1 here; FSDP2 still records the (_StridedShard, Shard) layout
    check_hf(two_ranks, {"e4": ["_S(0, 2)", "S(0)"], "e2_top1": ["_S(0, 2)", "S(0)"]})


@pytest.mark.slow
def test_ep2_times_ep_fsdp2_on_four_ranks(tmp_path, one_rank):
    """ep=2 x ep_fsdp=2: expert weights FSDP-sharded inside each EP slice (_StridedShard, or Shard(1) when a rank
    holds fewer experts than ep_fsdp ranks); gradients divided by the world-wide factor; the gradient norm
    reduced over both expert axes."""
    report = run_ep_worker(tmp_path, 4)
    assert_same_steps(one_rank, report["train"])
    check_errors(report)
    check_dispatch(report)
    check_bad_ids(report, 4)
    check_strategies(report)
    check_hf(report, {"e4": ["_S(0, 2)", "S(0)"], "e2_top1": ["S(1)", "S(0)"]})
