"""``load_hf_weights`` / ``save_hf_weights`` on a model sharded over 2 ranks (FSDP2 and other DTensor layouts)
against a 1-rank load, through ``fsdp_hf_worker.py`` under torchrun (gloo, CPU)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from dist_launch import torchrun
from hf_tiny import read_checkpoint, save_hf_checkpoint

from veofast.models import build_foundation_model

WORKER = os.path.join("tests", "models", "fsdp_hf_worker.py")
CASES = {"qwen2_moe": dict(vocab_size=127), "llama_tied_llama3_rope": {}}  # 127: uneven Shard(0) of embeddings


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    """Write one sharded checkpoint per case, run the worker on 2 ranks once, return {case: (ckpt, out)}."""
    root = tmp_path_factory.mktemp("fsdp_hf")
    runs, args = {}, []
    for case, overrides in CASES.items():
        checkpoint, out = root / f"{case}_ckpt", root / f"{case}_out"
        save_hf_checkpoint(case, checkpoint, max_shard_size="20KB", **overrides)
        assert (checkpoint / "model.safetensors.index.json").is_file()
        out.mkdir()
        runs[case] = (checkpoint, out)
        args += [str(checkpoint), str(out)]
    torchrun(WORKER, *args, nproc=2)
    return runs


@pytest.mark.parametrize("case", list(CASES))
def test_sharded_load_and_save_match_one_rank(case, two_rank_run):
    checkpoint, out = two_rank_run[case]
    reference = build_foundation_model(weights_path=str(checkpoint), init_device="cpu", ops_backend="torch")
    expected = {name: t.detach() for name, t in reference.named_parameters()}
    for gathered in ("fsdp.safetensors", "dtensor.safetensors"):
        tensors = read_checkpoint(out / gathered)
        assert tensors.keys() == expected.keys(), gathered
        for name, tensor in tensors.items():
            torch.testing.assert_close(tensor, expected[name], atol=0, rtol=0, msg=f"{gathered}: {name}")

    original, saved = read_checkpoint(checkpoint), read_checkpoint(out / "saved")
    assert saved.keys() == original.keys()
    for key, tensor in saved.items():
        assert torch.equal(tensor, original[key]), key
    assert (out / "saved" / "model.safetensors.index.json").is_file()
    for rank in range(2):
        memory = json.loads((out / f"rank{rank}.json").read_text())
        assert memory["max_rss_mib_after_load"] > 0
        expert_keys = json.loads((out / f"rank{rank}_expert_keys.json").read_text())
        experts_read = {int(key.split(".experts.")[1].split(".")[0]) for key in expert_keys}
        assert experts_read == ({2 * rank, 2 * rank + 1} if "moe" in case else set())  # only its own experts
