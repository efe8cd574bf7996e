"""bench/optimizer.py: a CPU smoke run (Triton step under the interpreter) records every provider and mode (step,
step + clip)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_smoke_run_records_each_provider_and_mode(tmp_path):
    env = dict(os.environ, VEOFAST_BENCH_RESULTS=str(tmp_path), TRITON_INTERPRET="1")
    subprocess.run([sys.executable, "bench/optimizer.py", "--smoke"], cwd=ROOT, env=env, check=True, timeout=600)
    rows = [json.loads(line) for line in open(tmp_path / "optimizer.jsonl")]
    assert {(r["provider"], r["mode"]) for r in rows} == {
        (p, v) for p in ("veofast", "torch-foreach") for v in ("step", "+clip")
    }
    assert all(r["ms"] > 0 and r["params"] == rows[0]["params"] > 0 for r in rows)
