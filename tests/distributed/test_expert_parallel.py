"""Expert parallelism on CPU/gloo: EP=2 gives the losses, aux losses and gradient norms of EP=1 on one rank;
the dispatcher matches the reference with empty experts and idle ranks; bad expert counts fail clearly; HF
checkpoints load into and save out of EP models exactly.

Tolerance of the training comparison: rel 2e-5 in fp32 (the EP path sums the same products in another order:
permute -> grouped GEMMs -> unpermute instead of the reference's per-expert loop, and the gradient reductions
run over other groups). The dispatcher comparison runs in float64 (abs 1e-12).
"""

import json

import pytest
from dist_launch import torchrun

TRAIN_WORKER = "tests/distributed/workers/train_steps_worker.py"
EP_WORKER = "tests/distributed/workers/ep_worker.py"
CASES = ("random", "idle_rank", "empty_experts", "all_remote")


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
    for x, y in zip(a, b):
        assert x["label_tokens"] == y["label_tokens"]
        for key in ("loss", "aux_loss", "grad_norm"):
            assert x[key] == pytest.approx(y[key], rel=rel), (key, a, b)


def check_report(report, one_rank, strided: bool):
    for message in report["errors"]:
        assert "num_experts=3" in message and "ep_size=2" in message, report["errors"]
    assert len(report["errors"]) == 2
    assert set(report["dispatch"]) == set(CASES)
    for case, errors in report["dispatch"].items():
        assert max(errors.values()) < 1e-12, (case, errors)
    for tag, hf in report["hf"].items():
        assert hf["same_params"] and hf["same_files"], (tag, hf)
    first = "_StridedShard" if strided else "Shard(dim=0)"
    assert report["hf"]["e4"]["placements"][0].startswith(first), report["hf"]
    assert report["hf"]["e4"]["placements"][1] == "Shard(dim=0)", report["hf"]
    assert_same_steps(one_rank, report["train"])


def test_ep2_on_two_ranks_matches_one_rank(two_ranks, one_rank):
    check_report(two_ranks, one_rank, strided=False)


def test_indivisible_experts_fail_before_any_collective(two_ranks):
    # raised on rank 0 alone: a collective before the check would have hung the worker
    assert len(two_ranks["errors"]) == 2
    for message in two_ranks["errors"]:
        assert "num_experts=3" in message and "not divisible by ep_size=2" in message


def test_experts_without_tokens(two_ranks):
    for case in ("idle_rank", "empty_experts", "all_remote"):
        assert max(two_ranks["dispatch"][case].values()) < 1e-12, two_ranks["dispatch"][case]


@pytest.mark.slow
def test_ep2_times_ep_fsdp2_on_four_ranks_matches_one_rank(tmp_path, one_rank):
    """ep=2 x ep_fsdp=2: expert weights FSDP-sharded inside each EP slice (_StridedShard, and Shard(1) when a
    rank holds fewer experts than ep_fsdp ranks), gradients divided by the world-wide factor."""
    check_report(run_ep_worker(tmp_path, 4), one_rank, strided=True)
