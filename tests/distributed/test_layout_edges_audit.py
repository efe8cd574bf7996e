"""Model and batch shapes at the edges of a layout train as on one rank: packed micro-batches shorter than the SP
group (ranks that hold only padding, no token of any document), one KV head replicated over four SP ranks, and
EP ranks that route one token each. Tolerance as in ``test_sequence_parallel`` (rel 2e-5, fp32)."""

import json

import pytest
from dist_launch import torchrun

WORKER = "tests/distributed/workers/short_batch_worker.py"
LENGTHS = "1/2,1/5"  # micro-batches of 1, 3 and 5 tokens: 4 SP ranks get 3, 3 and 1 padding tokens


def run(tmp_path, nproc, *args):
    out = tmp_path / f"out_{nproc}.json"
    torchrun(WORKER, str(out), *args, nproc=nproc, timeout=120)
    return json.loads(out.read_text())


def assert_same(single, parallel, label_scale=1):
    assert len(single) == len(parallel)
    for a, b in zip(single, parallel, strict=True):
        assert b["label_tokens"] == a["label_tokens"] * label_scale and not b["skipped"]
        for key in ("loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=2e-5), (key, single, parallel)


def test_sp4_short_micro_batches_one_kv_head(tmp_path):
    assert_same(run(tmp_path, 1, "llama", LENGTHS, "kv=1"), run(tmp_path, 4, "llama", LENGTHS, "sp=4", "kv=1"))


def test_ep2_one_token_per_micro_batch(tmp_path):
    # both ranks take the same micro-batches (dp=2): the loss is one rank's, the label count twice it
    assert_same(run(tmp_path, 1, "qwen3_moe", LENGTHS), run(tmp_path, 2, "qwen3_moe", LENGTHS, "ep=2"), label_scale=2)
