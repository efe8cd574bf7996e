"""Checkpoints: a save interrupted half-way leaves the last good checkpoint loadable; save/load round trip."""

import os
import re
import traceback

import pytest
import torch
from torch.distributed.checkpoint.api import CheckpointException

import veofast.checkpoint.checkpointer as checkpointer
from veofast.checkpoint import find_latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from veofast.distributed.parallel_state import destroy_parallel_state, init_parallel_state


@pytest.fixture
def single_process():
    destroy_parallel_state()
    init_parallel_state(device_type="cpu")
    yield
    destroy_parallel_state()


def make_state(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_round_trip_restores_model_optimizer_rng(tmp_path, single_process):
    model, optimizer = make_state(0)
    torch.manual_seed(123)
    path = save_checkpoint(str(tmp_path), 7, model, optimizer, {"global_step": 7, "dataloader": {"pos": [1, 2]}})
    expected_draw = torch.rand(3)
    other, other_opt = make_state(1)
    extra = load_checkpoint(path, other, other_opt)
    assert extra == {"global_step": 7, "dataloader": {"pos": [1, 2]}}
    assert torch.equal(torch.rand(3), expected_draw)  # RNG restored to the state at save time
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b)
    state_a = optimizer.state_dict()["state"]
    state_b = other_opt.state_dict()["state"]
    assert all(torch.equal(state_a[k]["exp_avg"], state_b[k]["exp_avg"]) for k in state_a)


def test_interrupted_save_keeps_last_good_checkpoint(tmp_path, single_process, monkeypatch):
    model, optimizer = make_state(0)
    good = save_checkpoint(str(tmp_path), 1, model, optimizer, {"global_step": 1})
    reference = [p.detach().clone() for p in model.parameters()]

    real_save = checkpointer.dcp.save

    def save_then_die(state, checkpoint_id):
        real_save(state, checkpoint_id=checkpoint_id)  # shards are on disk, the marker and rename are not
        raise KeyboardInterrupt("killed during save")

    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    monkeypatch.setattr(checkpointer.dcp, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(str(tmp_path), 2, model, optimizer, {"global_step": 2})
    monkeypatch.setattr(checkpointer.dcp, "save", real_save)

    assert os.path.isdir(os.path.join(tmp_path, "checkpoints", "global_step_2.tmp"))
    assert find_latest_checkpoint(str(tmp_path)) == good
    assert [step for step, _ in list_checkpoints(str(tmp_path))] == [1]
    fresh, fresh_opt = make_state(5)
    assert load_checkpoint(good, fresh, fresh_opt)["global_step"] == 1
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), reference))

    # the next save of that step replaces the half-written directory and completes
    again = save_checkpoint(str(tmp_path), 2, model, optimizer, {"global_step": 2})
    assert find_latest_checkpoint(str(tmp_path)) == again
    assert not os.path.exists(again + ".tmp")

    # saving that step once more (an overwritten run) replaces the complete one, leaving nothing beside it
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert save_checkpoint(str(tmp_path), 2, model, optimizer, {"global_step": 2}) == again
    assert sorted(os.listdir(os.path.join(tmp_path, "checkpoints"))) == ["global_step_1", "global_step_2"]
    assert load_checkpoint(again, fresh, fresh_opt)["global_step"] == 2
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters()))


def test_save_removes_half_written_saves_of_other_steps(tmp_path, single_process):
    """A run killed during its step-3 save and resumed with other save_steps never writes step 3 again: the next save
    deletes that half-written directory (it stayed for good before), and nothing else."""
    model, optimizer = make_state(0)
    root = os.path.join(tmp_path, "checkpoints")
    for name in ("global_step_3.tmp", "global_step_1", "notes.tmp"):
        os.makedirs(os.path.join(root, name))
    save_checkpoint(str(tmp_path), 2, model, optimizer, {"global_step": 2})
    assert sorted(os.listdir(root)) == ["global_step_1", "global_step_2", "notes.tmp"]


def test_keep_and_errors(tmp_path, single_process):
    model, optimizer = make_state(0)
    for step in (1, 2, 3):
        save_checkpoint(str(tmp_path), step, model, optimizer, {"global_step": step}, keep=2)
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [2, 3]
    with pytest.raises(FileNotFoundError, match="not a complete veofast checkpoint"):
        load_checkpoint(str(tmp_path / "nothing"), model, optimizer)


def test_latest_skips_empty_and_incomplete_checkpoints(tmp_path, single_process):
    """``auto`` never picks a directory without a marker, with a file missing, or with a file cut short."""
    model, optimizer = make_state(0)
    paths = {step: save_checkpoint(str(tmp_path), step, model, optimizer, {"global_step": step}) for step in (1, 2, 3)}
    with open(os.path.join(paths[2], "extra_state_rank0.pt"), "r+b") as f:
        f.truncate(10)  # a copy cut short
    os.remove(os.path.join(paths[3], ".metadata"))  # a file lost
    os.makedirs(checkpointer.checkpoint_path(str(tmp_path), 4))  # an empty step directory
    assert find_latest_checkpoint(str(tmp_path)) == paths[1]
    assert list_checkpoints(str(tmp_path)) == [(1, paths[1])]
    with pytest.raises(FileNotFoundError, match="is missing .metadata"):
        load_checkpoint(paths[3], model, optimizer)
    with pytest.raises(FileNotFoundError, match="extra_state_rank0.pt of 10 bytes"):
        load_checkpoint(paths[2], model, optimizer)


def test_world_size_mismatch_is_named(tmp_path, single_process):
    """A checkpoint resumed at another world size fails up front, naming both sizes, for new and older markers."""
    model, optimizer = make_state(0)
    path = save_checkpoint(str(tmp_path), 1, model, optimizer, {"global_step": 1})
    with pytest.raises(ValueError, match="saved at world size 1 and this run's world size is 2"):
        checkpointer.check_checkpoint(path, world_size=2)
    with open(os.path.join(path, checkpointer.COMPLETE), "w") as f:
        f.write("1\n")  # the marker of checkpoints saved before the manifest: the world size is the extra states'
    checkpointer.check_checkpoint(path, world_size=1)
    with pytest.raises(ValueError, match="saved at world size 1 and this run's world size is 2"):
        checkpointer.check_checkpoint(path, world_size=2)


@pytest.mark.parametrize("keep, kept", [(1, [2, 3]), (2, [1, 2, 3])])
def test_keep_spares_the_new_checkpoint_and_later_ones(tmp_path, single_process, keep, kept):
    """A run resumed from step 1 while step 3 exists saves step 2: retention deletes only checkpoints before it."""
    model, optimizer = make_state(0)
    for step in (1, 2, 3):
        save_checkpoint(str(tmp_path), step, model, optimizer, {"global_step": step})
    save_checkpoint(str(tmp_path), 2, model, optimizer, {"global_step": 2}, keep=keep)
    assert [step for step, _ in list_checkpoints(str(tmp_path))] == kept


@pytest.mark.parametrize(
    "marker, message",
    [
        ('{"format": "veofast.checkpoint/1", "step": 2, "world_size": 1}', "its files entry is missing"),
        ('{"format": "veofast.checkpoint/1", "step": 2, "world_size": 1, "files": [".metadata"]}', "its files entry"),
        ('{"format": "veofast.checkpoint/1", "step": 2, "world_size": "1", "files": {}}', "its world_size"),
        ('{"format": "veofast.checkpoint/1", "step": 2, "world_size": 1, "files": {"../../x": 1}}', "'../../x'"),
        ("true", "not a veofast manifest"),
    ],
)
def test_damaged_manifest_is_skipped_and_named(tmp_path, single_process, marker, message):
    """A COMPLETE marker in our format with a missing or malformed field is an incomplete checkpoint: ``auto``
    falls back to the one before, and naming it explicitly says what is wrong (it was a KeyError crash)."""
    model, optimizer = make_state(0)
    good = save_checkpoint(str(tmp_path), 1, model, optimizer, {"global_step": 1})
    damaged = save_checkpoint(str(tmp_path), 2, model, optimizer, {"global_step": 2})
    with open(os.path.join(damaged, checkpointer.COMPLETE), "w") as f:
        f.write(marker)
    assert find_latest_checkpoint(str(tmp_path)) == good
    with pytest.raises(FileNotFoundError, match=f"not a complete veofast checkpoint: it .*{re.escape(message)}"):
        checkpointer.check_checkpoint(damaged, world_size=1)


def test_load_failures_are_ordinary_errors_naming_the_checkpoint(tmp_path, single_process):
    """DCP reports a checkpoint that does not fit the model with a ``CheckpointException``, a ``BaseException`` that
    the training script's ``except Exception`` (which ends the process group cleanly) would miss; a damaged extra
    state file gave torch's advice to load it unsafely. Both are ``ValueError``s naming the checkpoint."""
    model, optimizer = make_state(0)
    path = save_checkpoint(str(tmp_path), 1, model, optimizer, {"global_step": 1})
    other = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 2))
    with pytest.raises(
        ValueError,
        match=f"checkpoint '{re.escape(path)}' could not be loaded into this model "
        r"\(ValueError on rank 0: Size mismatch",
    ):
        load_checkpoint(path, other, torch.optim.AdamW(other.parameters()))
    extra_file = os.path.join(path, "extra_state_rank0.pt")
    size = os.path.getsize(extra_file)
    with open(extra_file, "r+b") as f:
        f.write(b"\0" * size)  # damaged, same size: the manifest cannot tell
    with pytest.raises(ValueError, match="extra_state_rank0.pt cannot be read .* resume from an earlier checkpoint"):
        load_checkpoint(path, model, optimizer)


def test_save_failure_is_an_ordinary_error(tmp_path, single_process, monkeypatch):
    """A DCP write that fails (a full disk, say) raises a ``RuntimeError`` naming the checkpoint, not DCP's
    ``BaseException``; the earlier checkpoint stays the newest complete one."""
    model, optimizer = make_state(0)
    good = save_checkpoint(str(tmp_path), 1, model, optimizer, {"global_step": 1})

    def disk_full(state, checkpoint_id):
        failure = OSError(28, "No space left on device")
        raise CheckpointException("write failed", {0: (failure, traceback.StackSummary())})

    monkeypatch.setattr(checkpointer.dcp, "save", disk_full)
    with pytest.raises(RuntimeError, match="saving checkpoint .*global_step_2' failed .*No space left on device"):
        save_checkpoint(str(tmp_path), 2, model, optimizer, {"global_step": 2})
    assert find_latest_checkpoint(str(tmp_path)) == good


def test_move_aside_checkpoints_keeps_them_out_of_auto(tmp_path, single_process):
    """A run starting anew in another run's output_dir keeps that run's checkpoints as ``checkpoints.<k>``, so that
    a later ``load_path auto`` resumes from its own only; with no complete checkpoint nothing is moved."""
    model, optimizer = make_state(0)
    os.makedirs(checkpointer.checkpoint_path(str(tmp_path), 5) + ".tmp")  # only a half-written save
    assert checkpointer.move_aside_checkpoints(str(tmp_path)) is None
    for step in (4, 8):
        save_checkpoint(str(tmp_path), step, model, optimizer, {"global_step": step})
    os.makedirs(checkpointer.checkpoint_path(str(tmp_path), 5) + ".tmp")  # (the saves removed the first one)
    kept = checkpointer.move_aside_checkpoints(str(tmp_path))
    assert kept == os.path.join(tmp_path, "checkpoints.1")
    assert sorted(os.listdir(kept)) == ["global_step_4", "global_step_5.tmp", "global_step_8"]
    assert find_latest_checkpoint(str(tmp_path)) is None
    mine = save_checkpoint(str(tmp_path), 2, model, optimizer, {"global_step": 2})
    assert find_latest_checkpoint(str(tmp_path)) == mine
