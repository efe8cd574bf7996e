"""Kill-and-resume across parallel layouts and damaged checkpoint directories, through ``tasks/train.py`` on CPU.

Each end-to-end test trains an uninterrupted reference run, copies its output_dir cut back to an earlier
checkpoint (what a run killed right after that checkpoint leaves, its later checkpoints and metrics gone), damages
the newest checkpoint the way a crash or a broken copy does, and resumes the copy with ``--train.load_path auto``:
``auto`` must fall back to the last good checkpoint, say which one it skipped and why, and every later step must
log exactly the reference's loss, grad norm, lr, token count and eval loss. A resume with another number of
processes is refused up front, naming both sizes.
"""

import json
import os
import shutil

import pytest
import torch
from dist_launch import torchrun

from veofast.checkpoint import find_latest_checkpoint
from veofast.data import build_dataloader, build_iterative_dataset, build_mapping_dataset
from veofast.data.data_loader import SNAPSHOT_EVERY

NO_EVAL = ["--data.eval_path", "null", "--train.eval_steps", "0"]
COMPARED = ("loss", "grad_norm", "lr", "tokens", "eval_loss", "aux_loss", "epoch")


def records(output_dir) -> dict[int, dict]:
    """step -> the compared fields of its metrics.jsonl record (a resumed run's later lines win)."""
    out = {}
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            out[record["step"]] = {key: record.get(key) for key in COMPARED}
    return out


def train(config, output_dir, *args, nproc=2, check=True):
    return torchrun(
        "tasks/train.py", config, "--train.output_dir", str(output_dir), *args, nproc=nproc, check=check, timeout=600
    )


def cut_back(reference, copy, step):
    """Copy run ``reference`` to ``copy`` as a run killed right after its step-``step`` checkpoint left it."""
    shutil.copytree(reference, copy)
    for name in os.listdir(copy / "checkpoints"):
        if int(name.rsplit("_", 1)[1]) > step:
            shutil.rmtree(copy / "checkpoints" / name)
    with open(copy / "metrics.jsonl") as f:
        kept = [line for line in f if json.loads(line)["step"] <= step]
    with open(copy / "metrics.jsonl", "w") as f:
        f.writelines(kept)


def resume_and_compare(config, reference, copy, args, *, skipped, reason, resumed_at):
    """Resume ``copy`` with ``load_path auto``: it skips checkpoint ``skipped`` for ``reason``, resumes at step
    ``resumed_at`` and logs every later step as ``reference`` did."""
    proc = train(config, copy, *args, "--train.load_path", "auto")
    skipped_path = copy / "checkpoints" / f"global_step_{skipped}"
    assert f"skipping checkpoint {skipped_path}: it {reason}" in proc.stderr, proc.stderr[-3000:]
    assert f"resumed from {copy / 'checkpoints' / f'global_step_{resumed_at}'} at step {resumed_at}" in proc.stderr
    expected, got = records(reference), records(copy)
    assert sorted(got) == sorted(expected)
    for step in sorted(expected):
        if step > resumed_at:
            assert got[step] == expected[step], (step, got[step], expected[step])
    # the damaged checkpoint was saved anew over, and is the one a later auto would take if it is the newest
    newest = max(int(name.rsplit("_", 1)[1]) for name in os.listdir(reference / "checkpoints"))
    assert find_latest_checkpoint(str(copy)) == str(copy / "checkpoints" / f"global_step_{newest}")
    return proc


def refused_on_one_process(config, output_dir, *args):
    proc = train(config, output_dir, *args, "--train.load_path", "auto", nproc=1, check=False)
    assert proc.returncode != 0
    assert "was saved at world size 2 and this run's world size is 1" in proc.stderr, proc.stderr[-3000:]
    assert "--nproc_per_node=2" in proc.stderr


@pytest.mark.slow
def test_expert_parallel_zero3_accumulation_iterable_resume(tmp_path):
    """EP 2 + ZeRO-3 + 2 micro-batches per step, streamed data, save_steps 2 not dividing max_steps 5, evaluation
    between: the newest checkpoint cut back to (step 4) has a shard file truncated after its COMPLETE manifest was
    written, so auto falls back to step 2; steps 3-5 match. One process cannot resume it."""
    common = (
        "--train.enable_full_shard true --train.global_batch_size 8 --data.datasets_type iterable "
        "--train.max_steps 5 --train.save_steps 2 --train.eval_steps 3 --train.eval_batches 1"
    ).split()
    args = [*common, "--train.expert_parallel_size", "2"]
    reference, copy = tmp_path / "reference", tmp_path / "resumed"
    train("configs/moe.yaml", reference, *args)
    assert sorted(os.listdir(reference / "checkpoints")) == ["global_step_2", "global_step_4", "global_step_5"]
    cut_back(reference, copy, 4)
    shard = copy / "checkpoints" / "global_step_4" / "__1_0.distcp"
    size = os.path.getsize(shard)
    os.truncate(shard, 100)
    resume_and_compare(
        "configs/moe.yaml",
        reference,
        copy,
        args,
        skipped=4,
        resumed_at=2,
        reason=f"has __1_0.distcp of 100 bytes, {size} when it was saved",
    )
    refused_on_one_process("configs/moe.yaml", copy, *common)


@pytest.mark.slow
def test_ulysses_resume_at_an_epoch_boundary(tmp_path):
    """Ulysses SP 2 on the dense model, 3 steps per epoch over 2 epochs: cut back to step 3 (an epoch boundary)
    with an empty step-5 directory and a step-4 directory without its COMPLETE marker (a copy stopped half-way)
    after it, auto resumes at step 3 and steps 4-6 match. One process (without SP) cannot resume it."""
    common = "--train.train_steps 3 --train.num_train_epochs 2 --train.max_steps 6 --train.save_steps 1".split()
    common += NO_EVAL
    args = [*common, "--train.ulysses_parallel_size", "2"]
    reference, copy = tmp_path / "reference", tmp_path / "resumed"
    train("configs/dense.yaml", reference, *args)
    cut_back(reference, copy, 3)
    shutil.copytree(reference / "checkpoints" / "global_step_4", copy / "checkpoints" / "global_step_4")
    os.remove(copy / "checkpoints" / "global_step_4" / "COMPLETE")
    (copy / "checkpoints" / "global_step_5").mkdir()
    proc = resume_and_compare(
        "configs/dense.yaml", reference, copy, args, skipped=5, resumed_at=3, reason="has no COMPLETE marker"
    )
    assert f"skipping checkpoint {copy / 'checkpoints' / 'global_step_4'}: it has no COMPLETE marker" in proc.stderr
    assert [r["epoch"] for _, r in sorted(records(copy).items())] == [0, 0, 0, 1, 1, 1]
    refused_on_one_process("configs/dense.yaml", copy, *common)


@pytest.mark.slow
def test_ddp_padding_accumulation_resume_mid_epoch(tmp_path):
    """DDP with padded (not packed) micro-batches, 2 per step, and the HF export at each checkpoint: cut back to
    step 2 with a step-4 COMPLETE marker that is not a manifest (emptied), auto resumes at step 2 mid-epoch and
    steps 3-4 match."""
    args = (
        "--train.data_parallel_mode ddp --train.rmpad_with_pos_ids false --train.micro_batch_size 4 "
        "--train.global_batch_size 16 --train.max_steps 4 --train.save_steps 2 --train.save_hf_weights true"
    ).split()
    args += NO_EVAL
    reference, copy = tmp_path / "reference", tmp_path / "resumed"
    train("configs/dense.yaml", reference, *args)
    cut_back(reference, copy, 2)
    shutil.copytree(reference / "checkpoints" / "global_step_4", copy / "checkpoints" / "global_step_4")
    (copy / "checkpoints" / "global_step_4" / "COMPLETE").write_text("")
    resume_and_compare(
        "configs/dense.yaml",
        reference,
        copy,
        args,
        skipped=4,
        resumed_at=2,
        reason="has a COMPLETE marker that is not a veofast manifest ('')",
    )
    assert (copy / "checkpoints" / "global_step_4" / "hf" / "config.json").is_file()


def test_resume_removes_an_unfinished_hf_export(tmp_path):
    """A run killed while exporting its checkpoint's HF weights leaves the export's temporary directory (a whole copy
    of the weights) in the checkpoint; the resumed run writes the export and deletes that directory (it stayed for
    good before)."""
    out = tmp_path / "out"
    short = ["--train.max_steps", "2", *NO_EVAL]
    train("configs/moe.yaml", out, *short, nproc=1)
    final = out / "checkpoints" / "global_step_2"
    unfinished = final / ".hf.tmp-0123abcd"
    unfinished.mkdir()
    (unfinished / "model.safetensors").write_bytes(b"\0" * 64)  # cut short by the kill
    proc = train(
        "configs/moe.yaml", out, *short, "--train.save_hf_weights", "true", "--train.load_path", "auto", nproc=1
    )
    assert "nothing to train: resumed at step 2" in proc.stderr
    assert (final / "hf" / "config.json").is_file()
    assert not unfinished.exists()
    assert "left by an export that did not finish" in proc.stderr


def _sample(record):
    ids = [int(c) for c in record["text"]] + [2]
    return {"input_ids": ids, "labels": ids}


def test_loader_refuses_a_position_saved_over_another_dataset(tmp_path):
    """A loader position resumed over another kind of dataset (the run was resumed with another
    ``data.datasets_type``) or another number of records is refused, naming both: before, a position with a
    snapshot failed in the worker with a bare ``KeyError: 'position'``, and one without went on over other data in
    silence."""
    data, num_records = tmp_path / "data.jsonl", 40
    with open(data, "w") as f:
        for i in range(num_records):
            f.write(json.dumps({"text": str(1000 + i) * (1 + i % 5)}) + "\n")
    (tmp_path / "other").mkdir()
    shutil.copy(data, tmp_path / "other" / "data.jsonl")
    with open(tmp_path / "other" / "data.jsonl", "a") as f:
        f.write(json.dumps({"text": "12345"}) + "\n")

    def loader(dataset):
        return build_dataloader(
            dataset,
            micro_batch_size=1,
            global_batch_size=1,
            max_seq_len=16,
            seed=3,
            rmpad_with_pos_ids=True,
            dp_rank=0,
            dp_size=1,
        )

    mapping = loader(build_mapping_dataset(str(data), _sample))
    for _ in range(SNAPSHOT_EVERY + 1):  # past the first snapshot
        next(mapping)
    state = mapping.state_dict()
    with pytest.raises(
        ValueError,
        match=rf"dataset='MappingDataset of {num_records} records' vs "
        r"'IterativeDataset of 1 file'",
    ):
        loader(build_iterative_dataset(str(data), _sample, seed=3)).load_state_dict(state)
    with pytest.raises(
        ValueError,
        match=rf"dataset='MappingDataset of {num_records} records' vs "
        rf"'MappingDataset of {num_records + 1} records'",
    ):
        loader(build_mapping_dataset(str(tmp_path / "other"), _sample)).load_state_dict(state)
    same = loader(build_mapping_dataset(str(data), _sample))
    same.load_state_dict(state)
    assert torch.equal(next(same)[0]["input_ids"], next(mapping)[0]["input_ids"])
