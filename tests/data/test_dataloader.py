"""The dataloader: step structure, dynamic batching, warm-up, and exact resume with workers and 2 DP ranks."""

from __future__ import annotations

import io
from functools import partial

import pytest
import torch
from conftest import write_jsonl, write_parquet

import veofast.data.data_loader as data_loader
from veofast.data import build_dataloader, build_iterative_dataset, build_mapping_dataset
from veofast.data.data_transform import process_pretrain_example

MAX_SEQ_LEN = 64


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader_data")
    docs = [{"text": f"d{i:04d}" + "z" * (i * 7 % 41)} for i in range(400)]  # unique, <= 47 tokens with EOS
    write_jsonl(root / "a.jsonl", docs[:250])
    write_parquet(root / "b.parquet", docs[250:], row_group_size=32)
    return root


@pytest.fixture(scope="module")
def transform(tokenizer):
    return partial(process_pretrain_example, tokenizer=tokenizer, max_seq_len=MAX_SEQ_LEN)


def make_dataset(kind, data_dir, transform):
    if kind == "iterable":
        return build_iterative_dataset(data_dir, transform, seed=7, shuffle_buffer_size=8)
    return build_mapping_dataset(data_dir, transform)


def docs(micro_batch) -> list[tuple[int, ...]]:
    ids, cu = micro_batch["input_ids"][0].tolist(), micro_batch["cu_seqlens"].tolist()
    return [tuple(ids[a:b]) for a, b in zip(cu[:-1], cu[1:], strict=True)]


def same(step_a, step_b) -> bool:
    if len(step_a) != len(step_b):
        return False
    for a, b in zip(step_a, step_b, strict=True):
        if a.keys() != b.keys():
            return False
        for key in a:
            equal = torch.equal(a[key], b[key]) if isinstance(a[key], torch.Tensor) else a[key] == b[key]
            if not equal:
                return False
    return True


def roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize(
    ("kind", "snapshot_every", "num_workers"),
    [("iterable", 3, 2), ("mapping", 3, 2), ("iterable", 32, 2), ("iterable", 2, 0)],
)
def test_dynamic_batching_exact_resume(data_dir, transform, monkeypatch, kind, snapshot_every, num_workers):
    monkeypatch.setattr(data_loader, "SNAPSHOT_EVERY", snapshot_every)
    dataset = make_dataset(kind, data_dir, transform)
    build = partial(
        build_dataloader,
        dataset,
        micro_batch_size=2,
        global_batch_size=8,
        max_seq_len=MAX_SEQ_LEN,
        rmpad=True,
        dyn_bsz_buffer_size=16,
        num_workers=num_workers,
        dp_size=2,
        seed=11,
    )
    steps, cut = 10, 4
    seen = []
    for rank in range(2):
        reference = build(dp_rank=rank)
        expected = [next(reference) for _ in range(steps)]
        for step in expected:
            assert len(step) == 2  # 8 // (2 * 2) micro-batches per step
            for mb in step:
                assert mb["input_ids"].shape[1] <= 2 * MAX_SEQ_LEN and mb["num_label_tokens"] > 0
                seen += docs(mb)
        first = build(dp_rank=rank)
        loop = iter(first)  # the seed's loop calls iter() each epoch: it continues, it does not restart
        head = [next(loop) for _ in range(cut)]
        state = roundtrip(first.state_dict())
        del first, loop
        resumed = build(dp_rank=rank)
        resumed.load_state_dict(state)
        tail = [next(resumed) for _ in range(steps - cut)]
        assert all(same(a, b) for a, b in zip(head + tail, expected, strict=True))
    assert len(seen) == len(set(seen))  # no document twice across workers and ranks (less than an epoch read)


def test_packed_micro_batches_are_full(data_dir, transform):
    loader = build_dataloader(
        make_dataset("iterable", data_dir, transform),
        micro_batch_size=4,
        global_batch_size=4,
        max_seq_len=MAX_SEQ_LEN,
        rmpad_with_pos_ids=True,
        dyn_bsz_buffer_size=64,
        dyn_bsz_margin=6,
        dp_rank=0,
        dp_size=1,
    )
    tokens = [mb["input_ids"].shape[1] for _ in range(20) for mb in next(loader)]
    assert max(tokens) <= 4 * MAX_SEQ_LEN - 6
    assert sum(tokens) / (len(tokens) * (4 * MAX_SEQ_LEN - 6)) > 0.95


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_leaves_the_global_rng_alone(data_dir, transform, num_workers):
    """Starting and restarting the loader (as a resumed run does) draws nothing from torch's global RNG."""
    args = dict(micro_batch_size=2, global_batch_size=2, max_seq_len=MAX_SEQ_LEN, num_workers=num_workers)
    loader = build_dataloader(make_dataset("mapping", data_dir, transform), dp_rank=0, dp_size=1, **args)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    next(loader)
    restarted = build_dataloader(make_dataset("mapping", data_dir, transform), dp_rank=0, dp_size=1, **args)
    restarted.load_state_dict(roundtrip(loader.state_dict()))
    next(restarted)
    assert torch.equal(torch.get_rng_state(), before)


def test_padding_loader_and_resume(data_dir, transform):
    build = partial(
        build_dataloader,
        make_dataset("mapping", data_dir, transform),
        micro_batch_size=3,
        global_batch_size=12,
        max_seq_len=32,
        dp_rank=1,
        dp_size=2,
    )
    loader = build()
    step = next(loader)
    assert len(step) == 2
    for mb in step:
        assert mb["input_ids"].shape[0] == 3 and mb["input_ids"].shape[1] <= 32  # longer samples truncated
        assert set(mb) == {"input_ids", "labels", "attention_mask", "position_ids", "num_label_tokens"}
    state = loader.state_dict()
    expected = [next(loader) for _ in range(3)]
    resumed = build()
    resumed.load_state_dict(state)
    assert all(same(next(resumed), e) for e in expected)


def test_batch_size_warmup(data_dir, transform):
    loader = build_dataloader(
        make_dataset("mapping", data_dir, transform),
        micro_batch_size=2,
        global_batch_size=2,
        max_seq_len=MAX_SEQ_LEN,
        rmpad=True,
        train_steps=20,
        bsz_warmup_ratio=0.5,
        bsz_warmup_init_mbtoken=48,
        dyn_bsz_buffer_size=32,
        dp_rank=0,
        dp_size=1,
    )
    for step in range(14):
        (mb,) = next(loader)
        budget = 48 + (128 - 48) * step // 10 if step < 10 else 128
        assert mb["input_ids"].shape[1] <= budget or mb["cu_seqlens"].numel() == 2  # or one long sample alone


def test_custom_map_style_dataset():
    samples = [{"input_ids": [i, i + 1, i + 2], "labels": [i, i + 1, i + 2]} for i in range(0, 60, 3)]
    loader = build_dataloader(samples, micro_batch_size=2, global_batch_size=2, max_seq_len=8, dp_rank=0, dp_size=1)
    (mb,) = next(loader)
    assert mb["input_ids"].shape == (2, 3)


def cut_samples(i: int) -> dict:
    """12 tokens; even samples train only their last 2 tokens (lost to a cut at 8), odd ones train all. Pre-packed:
    two documents of 6 tokens (position_ids restart at 6)."""
    ids = [100 * i + t for t in range(12)]
    labels = [-100] * 10 + ids[10:] if i % 2 == 0 else list(ids)
    return {"input_ids": ids, "labels": labels, "position_ids": list(range(6)) * 2}


@pytest.mark.parametrize("mode", ["padding", "rmpad", "rmpad_with_pos_ids"])
def test_samples_left_untrainable_by_truncation_are_dropped(mode, monkeypatch):
    """The loader cuts samples to its budget (8 tokens here); one left with no trained label is dropped and logged,
    not collated into a micro-batch that stops the run, and pre-packed position_ids are cut with the tokens."""
    kwargs = {"rmpad": True} if mode == "rmpad" else {"rmpad_with_pos_ids": True} if mode != "padding" else {}
    build = partial(build_dataloader, micro_batch_size=1, global_batch_size=2, max_seq_len=8, dp_rank=0, dp_size=1)
    loader = build([cut_samples(i) for i in range(8)], **kwargs)
    micro_batches = [mb for _ in range(2) for mb in next(loader)]  # one epoch: the 4 odd samples
    assert sorted(mb["input_ids"][0, 0].item() // 100 for mb in micro_batches) == [1, 3, 5, 7]
    for mb in micro_batches:
        assert mb["input_ids"].shape == (1, 8) and mb["num_label_tokens"] == (7 if mode != "rmpad_with_pos_ids" else 6)
        if mode == "rmpad_with_pos_ids":
            assert mb["cu_seqlens"].tolist() == [0, 6, 8] and mb["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 0, 1]]
    from veofast.data.dynamic_batching import _Truncator

    monkeypatch.setattr(_Truncator, "MAX_DROPPED_IN_A_ROW", 5)
    with pytest.raises(ValueError, match="5 samples in a row had no trained label within"):
        next(build([cut_samples(2 * i) for i in range(8)], **kwargs))
    with pytest.raises(ValueError, match="max_seq_len must be >= 2"):
        build([cut_samples(1)], max_seq_len=1, global_batch_size=1)
    with pytest.raises(ValueError, match=r"dyn_bsz_margin must be in \[0, micro_batch_size \* max_seq_len - 2\]"):
        build([cut_samples(1)], dyn_bsz_margin=7, rmpad=True)


class PlainIterable(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield {"input_ids": [1, 2], "labels": [1, 2]}


def test_argument_errors(data_dir, transform):
    dataset = make_dataset("mapping", data_dir, transform)
    build = partial(build_dataloader, dataset, micro_batch_size=2, max_seq_len=MAX_SEQ_LEN, dp_rank=0)
    with pytest.raises(ValueError, match="not a multiple of micro_batch_size=2 \\* dp_size=2"):
        build(global_batch_size=6, dp_size=2)
    with pytest.raises(ValueError, match="dataloader_batch_size=3 must equal"):
        build(global_batch_size=8, dp_size=2, dataloader_batch_size=3)
    with pytest.raises(ValueError, match="at most one of rmpad"):
        build(global_batch_size=8, dp_size=1, rmpad=True, rmpad_with_pos_ids=True)
    with pytest.raises(ValueError, match="needs train_steps"):
        build(global_batch_size=8, dp_size=1, rmpad=True, bsz_warmup_ratio=0.1)
    with pytest.raises(ValueError, match=r"= 16777218 tokens per packed micro-batch is more than the packer's 2\*\*24"):
        build(global_batch_size=8, dp_size=1, rmpad=True, max_seq_len=2**23 + 1)
    with pytest.raises(ValueError, match="dp_rank must be in"):
        build_dataloader(dataset, micro_batch_size=1, global_batch_size=2, max_seq_len=8, dp_rank=2, dp_size=2)
    with pytest.raises(ValueError, match="fewer than the 6 shards"):
        five = [{"input_ids": [1, 2], "labels": [1, 2]}] * 5
        build_dataloader(
            five, micro_batch_size=1, global_batch_size=2, max_seq_len=8, dp_rank=0, dp_size=2, num_workers=3
        )
    with pytest.raises(TypeError, match="has no shard_stream"):
        build_dataloader(PlainIterable(), micro_batch_size=1, global_batch_size=1, max_seq_len=8, dp_rank=0, dp_size=1)
    loader = build(global_batch_size=4, dp_size=1)
    other = build(global_batch_size=8, dp_size=1)
    with pytest.raises(ValueError, match="num_micro_batches=2 vs 4"):
        other.load_state_dict(loader.state_dict())


def test_resume_refuses_other_packing_settings(data_dir, transform):
    """The packer's buffer and the batch-size warm-up decide which samples share a micro-batch: a state saved with
    other values is refused, naming them (it would repeat or skip samples); a state of an earlier veofast that did
    not save them still loads."""
    dataset = build_mapping_dataset(data_dir, transform)
    build = partial(
        build_dataloader, dataset, micro_batch_size=2, global_batch_size=2, max_seq_len=MAX_SEQ_LEN, dp_rank=0,
        dp_size=1, rmpad=True, train_steps=10, bsz_warmup_ratio=0.5,
    )  # fmt: skip
    saved = build(dyn_bsz_buffer_size=50, bsz_warmup_init_mbtoken=20)
    next(saved)
    state = saved.state_dict()
    with pytest.raises(ValueError, match=r"dyn_bsz_buffer_size=50 vs 60"):
        build(dyn_bsz_buffer_size=60, bsz_warmup_init_mbtoken=20).load_state_dict(state)
    with pytest.raises(ValueError, match=r"warmup=\(20, 5\) vs \(30, 5\)"):
        build(dyn_bsz_buffer_size=50, bsz_warmup_init_mbtoken=30).load_state_dict(state)
    earlier = {k: v for k, v in state.items() if k not in ("dyn_bsz_buffer_size", "warmup")}
    resumed = build(dyn_bsz_buffer_size=60, bsz_warmup_init_mbtoken=20)
    resumed.load_state_dict(earlier)
    assert resumed.state_dict()["micro_batches_served"] == state["micro_batches_served"]


@pytest.mark.parametrize(
    ("kind", "mode", "num_workers"),
    [("iterable", "padding", 2), ("mapping", "rmpad_with_pos_ids", 2), ("iterable", "rmpad_with_pos_ids", 0)],
)
def test_resume_in_every_batching_mode(data_dir, transform, monkeypatch, kind, mode, num_workers):
    """Saved between snapshots (during the batch-size warm-up when packing) and resumed on rank 1 of 3: the same
    steps as an uninterrupted run."""
    monkeypatch.setattr(data_loader, "SNAPSHOT_EVERY", 3)
    warmup = {"train_steps": 20, "bsz_warmup_ratio": 0.5, "bsz_warmup_init_mbtoken": 20}
    packed = {} if mode == "padding" else {mode: True, **warmup}
    build = partial(
        build_dataloader,
        make_dataset(kind, data_dir, transform),
        micro_batch_size=2,
        global_batch_size=12,
        max_seq_len=32,
        dyn_bsz_buffer_size=7,
        num_workers=num_workers,
        dp_rank=1,
        dp_size=3,
        seed=5,
        **packed,
    )
    reference = build()
    expected = [next(reference) for _ in range(9)]
    first = build()
    head = [next(first) for _ in range(4)]
    resumed = build()
    resumed.load_state_dict(roundtrip(first.state_dict()))
    assert all(same(a, b) for a, b in zip(head + [next(resumed) for _ in range(5)], expected, strict=True))
