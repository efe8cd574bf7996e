"""Saving and resuming training state with torch.distributed.checkpoint (DCP).

A checkpoint is ``<output_dir>/checkpoints/global_step_<N>/``: the sharded model and optimizer state (DCP,
each rank writes its own shards), one ``extra_state_rank<r>.pt`` per rank (scheduler, step, dataloader
position, RNG states: plain tensors and Python values, loaded with ``weights_only=True``) and a
``COMPLETE`` marker. It is written under ``global_step_<N>.tmp`` and renamed only once every rank has
finished, so a run killed during a save leaves the previous checkpoint intact; ``find_latest_checkpoint``
ignores anything without the marker.
"""

from __future__ import annotations

import os
import random
import re
import shutil

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
_STEP_DIR = re.compile(r"^global_step_(\d+)$")


def checkpoint_root(output_dir: str) -> str:
    return os.path.join(output_dir, CHECKPOINTS)


def checkpoint_path(output_dir: str, step: int) -> str:
    return os.path.join(checkpoint_root(output_dir), f"global_step_{step}")


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints under ``output_dir`` as ``(step, path)``, oldest first."""
    root = checkpoint_root(output_dir)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = _STEP_DIR.match(name)
        path = os.path.join(root, name)
        if match and os.path.isfile(os.path.join(path, COMPLETE)):
            found.append((int(match.group(1)), path))
    return sorted(found)


def find_latest_checkpoint(output_dir: str) -> str | None:
    """The newest complete checkpoint under ``output_dir``, or None."""
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def save_checkpoint(
    output_dir: str,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    extra_state: dict,
    *,
    keep: int = 0,
) -> str:
    """Save model + optimizer (sharded) and this rank's ``extra_state``; return the checkpoint path.

    ``keep > 0`` deletes the oldest complete checkpoints beyond the newest ``keep``.
    """
    final = checkpoint_path(output_dir, step)
    tmp = final + ".tmp"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a half-written save of our own from a killed run
        os.makedirs(tmp)
    _barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=tmp)
    torch.save({**extra_state, "rng": rng_state()}, os.path.join(tmp, f"extra_state_rank{_rank()}.pt"))
    _barrier()
    if _rank() == 0:
        with open(os.path.join(tmp, COMPLETE), "w") as f:
            f.write(f"{step}\n")
        if os.path.isdir(final):  # an earlier save of the same step (an overwritten run): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep > 0:
            for _, old in list_checkpoints(output_dir)[:-keep]:
                shutil.rmtree(old)
    _barrier()
    return final


def load_checkpoint(path: str, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """Load model and optimizer state from checkpoint ``path`` in place; return this rank's extra state
    (with RNG states already restored)."""
    if not os.path.isfile(os.path.join(path, COMPLETE)):
        raise FileNotFoundError(f"load_checkpoint: {path!r} is not a complete veofast checkpoint (no {COMPLETE})")
    extra_file = os.path.join(path, f"extra_state_rank{_rank()}.pt")
    if not os.path.isfile(extra_file):
        raise ValueError(
            f"load_checkpoint: {path!r} has no state for rank {_rank()}; it was saved with a different world size"
        )
    if optimizer is None:
        model_state = get_state_dict(model, [])[0]
        dcp.load({"model": model_state}, checkpoint_id=path)
        set_state_dict(model, [], model_state_dict=model_state, optim_state_dict={})
    else:
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optim_state}
        dcp.load(state, checkpoint_id=path)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    extra = torch.load(extra_file, weights_only=True)
    set_rng_state(extra.pop("rng"))
    return extra
