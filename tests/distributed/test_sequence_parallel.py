"""Ulysses sequence parallelism: the micro-batch slicing, the attention wrapper, and SP=2 training steps that
give the losses and gradient norms of SP=1.

Tolerance: the SP runs compute the same fp32 sums in another order (attention per head group, the output
projection split by heads, gradients reduced over more ranks), so losses and norms agree to rel 2e-5 (measured
differences are ~1e-7). The attention worker compares in float64 to rel 1e-9, for head chunk counts 1, 2 and
the most the local KV heads allow (and checks the order of the chunked pipeline's all-to-alls).
"""

import json
from types import SimpleNamespace

import pytest
import torch
from dist_launch import torchrun

from veofast.distributed.sequence_parallel import (
    UlyssesAttention,
    apply_sequence_parallel,
    resolve_transport,
    shard_micro_batch,
    ulysses_kv_replication,
)
from veofast.models import build_foundation_model
from veofast.models.config import DecoderConfig
from veofast.models.layers import Attention

TRAIN_WORKER = "tests/distributed/workers/train_steps_worker.py"
CHUNKS_TRAIN_WORKER = "tests/distributed/workers/sp_chunks_train_worker.py"
ATTENTION_WORKER = "tests/distributed/workers/sp_attention_worker.py"
TRANSPORT_WORKER = "tests/distributed/workers/transport_worker.py"


# ------------------------------------------------------------------------------------------- shard_micro_batch
def packed_example() -> dict:
    """Two documents of 3 and 4 tokens, as the packing collator makes them."""
    return {
        "input_ids": torch.tensor([[11, 12, 13, 21, 22, 23, 24]]),
        "labels": torch.tensor([[-100, 12, 13, -100, 22, 23, 24]]),
        "position_ids": torch.tensor([[0, 1, 2, 0, 1, 2, 3]]),
        "cu_seqlens": torch.tensor([0, 3, 7], dtype=torch.int32),
        "max_seqlen": 4,
        "num_label_tokens": 5,
    }


def test_shard_micro_batch_pads_shifts_and_counts():
    # 7 tokens -> 8: one padding token forms a third document; labels are shifted on the whole sequence first
    ranks = [shard_micro_batch(packed_example(), rank, 2) for rank in range(2)]
    expected = [
        {"input_ids": [[11, 12, 13, 21]], "shift_labels": [[12, 13, -100, 22]], "position_ids": [[0, 1, 2, 0]],
         "num_label_tokens": 3},
        {"input_ids": [[22, 23, 24, 0]], "shift_labels": [[23, 24, -100, -100]], "position_ids": [[1, 2, 3, 0]],
         "num_label_tokens": 2},
    ]
    for got, want in zip(ranks, expected, strict=True):
        assert set(got) == {"input_ids", "shift_labels", "position_ids", "cu_seqlens", "max_seqlen",
                            "num_label_tokens"}
        for key in ("input_ids", "shift_labels", "position_ids"):
            assert got[key].tolist() == want[key], key
        assert got["num_label_tokens"] == want["num_label_tokens"]
        assert got["cu_seqlens"].tolist() == [0, 3, 7, 8] and got["cu_seqlens"].dtype == torch.int32
        assert got["max_seqlen"] == 4
    assert sum(r["num_label_tokens"] for r in ranks) == packed_example()["num_label_tokens"]


def test_shard_micro_batch_three_ranks_and_no_padding():
    last = shard_micro_batch(packed_example(), 2, 3)  # 7 -> 9 tokens, a padding document of 2
    assert last["input_ids"].tolist() == [[24, 0, 0]]
    assert last["position_ids"].tolist() == [[3, 0, 1]]
    assert last["shift_labels"].tolist() == [[-100, -100, -100]] and last["num_label_tokens"] == 0
    assert last["cu_seqlens"].tolist() == [0, 3, 7, 9]
    whole = shard_micro_batch(packed_example(), 0, 1)  # SP=1: nothing padded, labels only shifted
    assert whole["cu_seqlens"].tolist() == [0, 3, 7]
    assert whole["shift_labels"].tolist() == [[12, 13, -100, 22, 23, 24, -100]]


def test_shard_micro_batch_errors():
    # names the settings that pack micro-batches, in the section that holds them
    with pytest.raises(ValueError, match=r"packed micro-batches .*\(set train\.rmpad_with_pos_ids or train\.rmpad\)"):
        shard_micro_batch({"input_ids": torch.zeros(2, 4, dtype=torch.long)}, 0, 2)
    with pytest.raises(ValueError, match="sp_rank"):
        shard_micro_batch(packed_example(), 2, 2)
    with pytest.raises(ValueError, match="pixel_values"):
        shard_micro_batch({**packed_example(), "pixel_values": torch.zeros(1)}, 0, 2)


# ----------------------------------------------------------------------------------------------- model wrapping
TINY = {"model_type": "qwen3", "vocab_size": 97, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "head_dim": 8}


def test_indivisible_heads_raise_at_apply_time():
    fake_ps = SimpleNamespace(sp_size=3, sp_group=None)
    model = build_foundation_model(config_overrides={**TINY, "num_attention_heads": 4, "num_key_value_heads": 2})
    with pytest.raises(ValueError, match=r"num_attention_heads \(4\) must be divisible by ulysses_size \(3\)"):
        apply_sequence_parallel(model, fake_ps)
    with pytest.raises(ValueError, match=r"num_key_value_heads \(6\)"):
        ulysses_kv_replication(12, 6, 4)
    assert ulysses_kv_replication(32, 8, 2) == 1
    assert ulysses_kv_replication(32, 8, 16) == 2


def test_apply_keeps_parameter_names():
    model = build_foundation_model(config_overrides={**TINY, "num_attention_heads": 4, "num_key_value_heads": 1})
    names = [name for name, _ in model.named_parameters()]
    apply_sequence_parallel(model, SimpleNamespace(sp_size=2, sp_group=None))
    assert isinstance(model.model.layers[0].self_attn, UlyssesAttention)
    assert model.model.layers[0].self_attn.kv_repeat == 2
    assert [name for name, _ in model.named_parameters()] == names
    assert "model.layers.1.self_attn.q_norm.weight" in names


def ulysses(heads: int, kv_heads: int, sp: int, **kwargs) -> UlyssesAttention:
    config = DecoderConfig(model_type="llama", hidden_size=16, head_dim=8, num_attention_heads=heads,
                           num_key_value_heads=kv_heads, ops_backend="torch")
    return UlyssesAttention(Attention(config), None, sp, **kwargs)


def test_head_chunks_default_and_errors():
    assert ulysses(32, 8, 2).head_chunks == 1  # unchunked unless asked
    layer = ulysses(32, 8, 2, head_chunks=2)  # the 7B shape at SP=2: 4 local KV heads
    assert layer.head_chunks == 2 and "head_chunks=2" in repr(layer)
    layer.head_chunks = 4
    with pytest.raises(ValueError, match=r"head_chunks must be an int >= 1 that divides the 4 KV head\(s\)"):
        ulysses(32, 8, 2, head_chunks=3)
    with pytest.raises(ValueError, match=r"divides the 1 KV head\(s\).*1 KV heads x 2 replicas"):
        ulysses(4, 1, 2, head_chunks=2)
    for bad in (0, -2, 8, 2.0, True, "2", None):
        with pytest.raises(ValueError, match="head_chunks"):
            layer.head_chunks = bad
    assert layer.head_chunks == 4  # unchanged by the failed assignments
    model = build_foundation_model(config_overrides={**TINY, "num_attention_heads": 8, "num_key_value_heads": 4})
    with pytest.raises(ValueError, match="head_chunks"):
        apply_sequence_parallel(model, SimpleNamespace(sp_size=2, sp_group=None), head_chunks=4)
    assert not any(isinstance(m, UlyssesAttention) for m in model.modules())  # nothing replaced
    apply_sequence_parallel(model, SimpleNamespace(sp_size=2, sp_group=None), head_chunks=1)
    assert model.model.layers[0].self_attn.head_chunks == 1


def test_ulysses_attention_matches_whole_sequence():
    torchrun(ATTENTION_WORKER, nproc=2)


# ------------------------------------------------------------------------------------------ whole training steps
def run(tmp_path, nproc, *options, worker=TRAIN_WORKER):
    out = tmp_path / f"out_{nproc}_{'_'.join(options)}.json"
    torchrun(worker, str(out), *options, nproc=nproc)
    return json.loads(out.read_text())


def assert_same(a, b, rel=2e-5):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x["label_tokens"] == y["label_tokens"]
        for key in ("loss", "grad_norm", "aux_loss"):
            if x[key] is not None:
                assert x[key] == pytest.approx(y[key], rel=rel), (key, a, b)


@pytest.fixture(scope="module")
def llama_single(tmp_path_factory):
    return run(tmp_path_factory.mktemp("sp"), 1, "llama")


def test_sp2_matches_sp1_llama(tmp_path, llama_single):
    # odd micro-batch lengths: the last rank's slice ends with a padding document
    assert_same(llama_single, run(tmp_path, 2, "llama", "sp=2"))


def test_sp2_matches_sp1_moe(tmp_path):
    # even lengths (align=2): no padding tokens, which would enter the MoE router statistics; with activation
    # checkpointing, so the router-statistics average is recomputed too
    single = run(tmp_path, 1, "qwen3_moe", "align=2")
    assert single[0]["aux_loss"] is not None
    assert_same(single, run(tmp_path, 2, "qwen3_moe", "sp=2", "align=2", "ckpt=1"))


def test_sp2_dp2_matches_single(tmp_path, llama_single):
    # with activation checkpointing: the recomputed forward repeats the all-to-alls in the backward
    assert_same(llama_single, run(tmp_path, 4, "llama", "sp=2", "ckpt=1"))


def test_sp2_head_chunks_match_sp1(tmp_path):
    # 16 query / 8 KV heads: the default pipeline of 4 head chunks per rank, with activation checkpointing (the
    # recomputed forward repeats the chunked all-to-alls inside the backward)
    single = run(tmp_path, 1, "llama_chunked", worker=CHUNKS_TRAIN_WORKER)
    assert_same(single, run(tmp_path, 2, "llama_chunked", "sp=2", "ckpt=1", "chunks=2", worker=CHUNKS_TRAIN_WORKER))


def test_transport_resolution():
    # CPU runs (and SP=1) take NCCL's path (gloo's all_to_all_single); explicit values are checked and kept
    cpu = SimpleNamespace(device_type="cpu", sp_size=2, sp_group=None)
    assert resolve_transport("auto", cpu) == "nccl"
    assert resolve_transport("auto", SimpleNamespace(device_type="cuda", sp_size=1, sp_group=None)) == "nccl"
    with pytest.raises(ValueError, match="'copy_engine' moves CUDA tensors"):
        resolve_transport("copy_engine", cpu)
    with pytest.raises(ValueError, match="transport must be one of"):
        resolve_transport("ring", cpu)


def test_transport_on_one_host_or_several(tmp_path):
    """A CUDA run's SP group on one host takes the copy engines (``auto`` or asked for); over two hosts ``auto``
    takes NCCL and an explicit ``copy_engine`` fails on every rank before training (it used to be kept, and the
    first forward failed in the symmetric-memory rendezvous)."""
    torchrun(TRANSPORT_WORKER, str(tmp_path), nproc=2, timeout=60)
    for rank in range(2):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert report["same"] == {"auto": "copy_engine", "copy_engine": "copy_engine", "nccl": "nccl"}, report
        assert report["split"]["auto"] == report["split"]["nccl"] == "nccl", report
        assert "copy_engine' needs every rank of a sequence-parallel group on one node" in report["split"][
            "copy_engine"], report
