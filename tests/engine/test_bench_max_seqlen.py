"""bench/max_seqlen.py: the length prediction, and a CPU smoke run of the script with SP=2."""

import json

import pytest
from dist_launch import torchrun

from bench.max_seqlen import predict_max_length


def test_prediction_follows_the_line_and_rounds_down():
    # peak = 10 GiB + 1 MiB per token: 100 GiB is reached at 92160 tokens
    gib, mib = 2**30, 2**20
    points = [(8192, 10 * gib + 8192 * mib), (16384, 10 * gib + 16384 * mib)]
    assert predict_max_length(points, 100 * gib, 1024) == 92160
    assert predict_max_length(points, 100 * gib, 2048) == 92160 // 2048 * 2048
    assert predict_max_length(points, 1.0, 1024) == 1024  # never below one multiple


def test_prediction_needs_a_growing_peak():
    with pytest.raises(ValueError, match="does not grow"):
        predict_max_length([(1024, 5.0), (2048, 5.0)], 10.0, 64)


def test_smoke_run_with_two_ranks(tmp_path):
    torchrun("bench/max_seqlen.py", "--tiny", env={"VEOFAST_BENCH_RESULTS": str(tmp_path)})
    (row,) = [json.loads(line) for line in open(tmp_path / "max_seqlen.jsonl")]
    assert row["gpus"] == 2 and row["sp"] == 2 and "error" not in row
    assert row["step_s_at_128"] > 0 and row["step_s_at_256"] > 0
