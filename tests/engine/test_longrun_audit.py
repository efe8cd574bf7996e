"""Long and interrupted runs: what a training process killed outright leaves behind.

A rank killed by SIGTERM or SIGKILL (a scheduler, ``kill``, the OOM killer) runs no cleanup, so its dataloader workers
must not depend on it: each watches its parent and exits once it is gone. A kill while a save deletes the oldest
checkpoint (``keep_checkpoints``) must not leave that checkpoint's files behind for good, and Ctrl-C during a save is
an interrupt, not a failed save.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from dist_launch import REPO
from torch.distributed.checkpoint.api import CheckpointException

import veofast.checkpoint.checkpointer as checkpointer
from veofast.checkpoint import save_checkpoint
from veofast.checkpoint.checkpointer import COMPLETE
from veofast.data.data_loader import SNAPSHOT_EVERY
from veofast.distributed.parallel_state import destroy_parallel_state, init_parallel_state

# A process that starts a loader with one worker, takes micro-batches until the worker has queued the one carrying
# its first resume snapshot (which holds the batcher's buffer of 2000 samples: more than a pipe holds), prints the
# worker's pid and kills itself with SIGKILL, as the OOM killer would.
KILLED_WITH_A_QUEUED_SNAPSHOT = f"""
import os, signal
from veofast.data import build_dataloader

samples = [{{"input_ids": list(range(40)), "labels": list(range(40))}} for _ in range(4000)]
loader = build_dataloader(samples, micro_batch_size=1, global_batch_size=1, max_seq_len=64, rmpad_with_pos_ids=True,
                          dyn_bsz_buffer_size=2000, num_workers=1, dp_rank=0, dp_size=1)
for _ in range({SNAPSHOT_EVERY} - 2):
    next(loader)
print(loader._iterator._workers[0].pid, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def running(pid: int) -> bool:
    """Whether process ``pid`` exists and has not exited (a zombie has)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_loader_workers_die_with_a_killed_process(tmp_path):
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p),
    }
    out = tmp_path / "out.txt"
    with open(out, "w") as f:  # a file, not a pipe: a worker left behind would hold a pipe open, and wait for it
        code = subprocess.run(
            [sys.executable, "-c", KILLED_WITH_A_QUEUED_SNAPSHOT],
            cwd=REPO,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            timeout=120,
        ).returncode
    assert code == -signal.SIGKILL, out.read_text()[-3000:]
    worker = int(out.read_text().split()[0])
    deadline = time.monotonic() + 3  # torch's own check of the parent comes every 5 s, and this worker never exits
    while running(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = running(worker)
    if left:
        os.kill(worker, signal.SIGKILL)
    assert not left, "the dataloader worker outlived its killed process"


def test_checkpoint_deletion_cut_short_is_finished_by_the_next_save(tmp_path, monkeypatch):
    """A run killed while ``keep_checkpoints`` deletes an old checkpoint left that checkpoint half-deleted: no longer
    complete, so no later save deleted it, and it held its disk space for good. The next save removes it."""
    destroy_parallel_state()
    init_parallel_state(device_type="cpu")
    try:
        model = torch.nn.Linear(4, 2)
        optimizer = torch.optim.AdamW(model.parameters())
        save_checkpoint(str(tmp_path), 1, model, optimizer, {"global_step": 1})

        def killed_while_deleting(path, *args, **kwargs):
            os.remove(os.path.join(path, COMPLETE))  # the marker goes first, the shards stay
            raise KeyboardInterrupt("killed during the deletion")

        monkeypatch.setattr(shutil, "rmtree", killed_while_deleting)
        with pytest.raises(KeyboardInterrupt):
            save_checkpoint(str(tmp_path), 2, model, optimizer, {"global_step": 2}, keep=1)
        monkeypatch.undo()
        save_checkpoint(str(tmp_path), 3, model, optimizer, {"global_step": 3}, keep=1)
        assert os.listdir(os.path.join(tmp_path, "checkpoints")) == ["global_step_3"]
    finally:
        destroy_parallel_state()


_torch_save = torch.save


def _interrupted_torch_save(obj, f, *args, **kwargs):
    """torch.save of a file (the rank's extra state; DCP saves to buffers) cut short by Ctrl-C: the zip writer's
    cleanup raises a RuntimeError in the interrupt's context."""
    if not isinstance(f, str):
        return _torch_save(obj, f, *args, **kwargs)
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt:
        raise RuntimeError("unexpected pos 704 vs 598") from None


def _interrupted_dcp_save(*args, **kwargs):
    """DCP's save with a rank interrupted: the interrupt is among its failures."""
    raise CheckpointException("save failed", {0: KeyboardInterrupt()})


@pytest.mark.parametrize("where", ["torch.save", "dcp.save"])
def test_ctrl_c_during_a_save_is_an_interrupt_not_a_failed_save(tmp_path, monkeypatch, where):
    """Ctrl-C during a save stops the run as an interrupt saying so (it was reported as a failed save, with a cause
    such as "unexpected pos 704 vs 598" from the zip writer it cut short)."""
    destroy_parallel_state()
    init_parallel_state(device_type="cpu")
    try:
        model = torch.nn.Linear(4, 2)
        optimizer = torch.optim.AdamW(model.parameters())
        if where == "torch.save":
            monkeypatch.setattr(checkpointer.torch, "save", _interrupted_torch_save)
        else:
            monkeypatch.setattr(checkpointer.dcp, "save", _interrupted_dcp_save)
        with pytest.raises(KeyboardInterrupt, match="interrupted while saving checkpoint"):
            save_checkpoint(str(tmp_path), 1, model, optimizer, {"global_step": 1})
    finally:
        destroy_parallel_state()
