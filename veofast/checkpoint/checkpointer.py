"""Saving and resuming training state with torch.distributed.checkpoint (DCP).

A checkpoint is ``<output_dir>/checkpoints/global_step_<N>/``: the sharded model and optimizer state (DCP,
each rank writes its own shards), one ``extra_state_rank<r>.pt`` per rank (scheduler, step, dataloader
position, RNG states: plain tensors and Python values, loaded with ``weights_only=True``) and a
``COMPLETE`` marker, a JSON manifest of the step, the world size and every file with its size. It is written
under ``global_step_<N>.tmp`` and renamed only once every rank has finished, so a run killed during a save
leaves the previous checkpoint intact (and the next save deletes what it left); a checkpoint being deleted (an
overwritten step, or one beyond ``keep``) is first renamed to ``global_step_<N>.old``, which the next save deletes
too if a kill cut the deletion short. A checkpoint is complete when its
marker is there and every file it lists is there with its size, and ``find_latest_checkpoint`` skips (with a
warning) anything that is not.
A checkpoint resumes only at the world size that saved it (the data loader position and RNG states are per rank).
A run that starts anew where another run saved checkpoints keeps them as ``<output_dir>/checkpoints.<k>/``
(``move_aside_checkpoints``), so that ``load_path auto`` only ever finds the new run's own.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from veofast.utils.helper import move_aside
from veofast.utils.logging import get_logger

logger = get_logger(__name__)

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
MANIFEST_FORMAT = "veofast.checkpoint/1"
_EXTRA_STATE = re.compile(r"^extra_state_rank(\d+)\.pt$")
_STEP_DIR = re.compile(r"^global_step_(\d+)$")
_LEFTOVER_STEP_DIR = re.compile(r"^global_step_\d+\.(tmp|old)$")


def checkpoint_root(output_dir: str) -> str:
    return os.path.join(output_dir, CHECKPOINTS)


def checkpoint_path(output_dir: str, step: int) -> str:
    return os.path.join(checkpoint_root(output_dir), f"global_step_{step}")


def _step_dirs(output_dir: str) -> list[tuple[int, str]]:
    """Every ``global_step_<N>`` directory under ``output_dir`` as ``(step, path)``, complete or not, oldest first."""
    root = checkpoint_root(output_dir)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = _STEP_DIR.match(name)
        path = os.path.join(root, name)
        if match and os.path.isdir(path):
            found.append((int(match.group(1)), path))
    return sorted(found)


def _write_manifest(path: str, step: int, world_size: int) -> None:
    """Write the ``COMPLETE`` marker of the checkpoint being saved in ``path``: what a complete copy holds."""
    files = {name: os.path.getsize(os.path.join(path, name)) for name in sorted(os.listdir(path))
             if os.path.isfile(os.path.join(path, name))}
    manifest = {"format": MANIFEST_FORMAT, "step": step, "world_size": world_size, "files": files}
    with open(os.path.join(path, COMPLETE), "w") as f:
        json.dump(manifest, f, indent=1)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _manifest_problem(manifest: dict) -> str | None:
    """What is wrong with the fields of a manifest that names our format, or None."""
    if not _is_int(manifest.get("world_size")) or manifest["world_size"] < 1:
        return f"world_size is missing or not an int >= 1 (got {manifest.get('world_size')!r})"
    files = manifest.get("files")
    if not isinstance(files, dict):
        return f"files entry is missing or not a mapping of file names to sizes (got {type(files).__name__})"
    for name, size in files.items():
        if not name or name in (".", "..") or "/" in name or os.sep in name:  # a file of this directory, no other
            return f"files names {name!r}, not a file of the checkpoint directory"
        if not _is_int(size) or size < 0:
            return f"the size of {name} is {size!r}, not an int >= 0"
    return None


def read_manifest(path: str) -> dict:
    """The ``COMPLETE`` marker of checkpoint ``path`` as ``{"world_size": int, "files": {name: size or None}}``.

    Markers written before the manifest hold only the step; for those, the files are DCP's ``.metadata`` and the
    per-rank extra states found, and the world size is their count. ``ValueError`` for an unreadable marker or
    one with a missing or malformed field.
    """
    with open(os.path.join(path, COMPLETE), "rb") as f:
        raw = f.read()
    try:
        text = raw.decode()
        manifest = json.loads(text)
    except ValueError:  # not UTF-8, or not JSON
        text, manifest = raw.decode(errors="replace"), None
    if isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT:
        problem = _manifest_problem(manifest)
        if problem is not None:
            raise ValueError(f"has a damaged {COMPLETE} manifest: its {problem}")
        return manifest
    if not _is_int(manifest):
        raise ValueError(f"has a {COMPLETE} marker that is not a veofast manifest ({text[:80]!r})")
    ranks = sum(1 for name in os.listdir(path) if _EXTRA_STATE.match(name))
    files = {".metadata": None, **{f"extra_state_rank{rank}.pt": None for rank in range(ranks)}}
    return {"world_size": ranks, "files": files}


def checkpoint_problem(path: str) -> str | None:
    """Why ``path`` is not a complete checkpoint (a phrase to follow the path in a message), or None if it is."""
    if not os.path.isdir(path):
        return "does not exist" if not os.path.exists(path) else "is not a directory"
    if not os.path.isfile(os.path.join(path, COMPLETE)):
        return f"has no {COMPLETE} marker (a save that did not finish, or not a checkpoint directory)"
    try:
        manifest = read_manifest(path)
    except ValueError as exc:
        return str(exc)
    for name, size in manifest["files"].items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            return f"is missing {name}"
        if size is not None and os.path.getsize(file) != size:
            return f"has {name} of {os.path.getsize(file)} bytes, {size} when it was saved"
    return None


def check_checkpoint(path: str, *, world_size: int) -> None:
    """Raise unless ``path`` is a complete checkpoint saved at ``world_size``: ``FileNotFoundError`` for a missing
    or incomplete one, ``ValueError`` for another world size. Reads only files, so every rank raises alike."""
    problem = checkpoint_problem(path)
    if problem is not None:
        raise FileNotFoundError(f"{path!r} is not a complete veofast checkpoint: it {problem}")
    saved = read_manifest(path)["world_size"]
    if saved != world_size:
        raise ValueError(
            f"checkpoint {path!r} was saved at world size {saved} and this run's world size is {world_size}: resuming "
            f"at another world size is not supported (the data loader position and RNG states are per rank); resume "
            f"with {saved} processes (torchrun --nproc_per_node={saved} on one node)"
        )


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints under ``output_dir`` as ``(step, path)``, oldest first."""
    return [(step, path) for step, path in _step_dirs(output_dir) if checkpoint_problem(path) is None]


def find_latest_checkpoint(output_dir: str) -> str | None:
    """The newest complete checkpoint under ``output_dir``, or None; newer incomplete ones are skipped with a
    warning that says what they lack."""
    for _, path in reversed(_step_dirs(output_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        logger.warning_rank0("skipping checkpoint %s: it %s", path, problem)
    return None


def move_aside_checkpoints(output_dir: str) -> str | None:
    """Rename ``<output_dir>/checkpoints`` to the first free ``checkpoints.<k>`` if it holds a complete checkpoint
    and return the new path, else None. A run that starts anew in the output_dir of another
    (``overwrite_output_dir``) keeps that run's checkpoints this way, and a later ``load_path auto`` can no longer
    resume it from one of them (say a step it had not reached itself when it was killed)."""
    if not list_checkpoints(output_dir):
        return None
    return move_aside(checkpoint_root(output_dir))


def prune_checkpoints(output_dir: str, step: int, keep: int) -> None:
    """Delete the oldest complete checkpoints before ``step`` so that ``keep`` remain up to and including step
    ``step`` (the one just saved). Checkpoints after ``step`` (say of a run resumed from an earlier one) and
    incomplete directories are left alone."""
    older = [path for saved, path in list_checkpoints(output_dir) if saved < step]
    for path in older[: max(0, len(older) - (keep - 1))]:
        _delete_checkpoint(path)


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


def _dcp_failure(exc: CheckpointException) -> str:
    """The first failing rank's error of a DCP save or load: ``<Type> on rank <r>: <message>``."""
    rank = min(exc.failures)
    failure = exc.failures[rank]
    if isinstance(failure, tuple):  # (exception, traceback summary)
        failure = failure[0]
    return f"{type(failure).__name__} on rank {rank}: {failure}"


def _interrupted(exc: BaseException | None) -> bool:
    """Whether ``exc`` comes from a Ctrl-C: a ``KeyboardInterrupt`` in its cause or context chain, or in that of a
    rank's failure that DCP wrapped (one inside ``torch.save`` surfaces as the ``RuntimeError`` of the writer it cut
    short, with the interrupt as its context)."""
    seen = []
    while exc is not None and not any(exc is e for e in seen):
        seen.append(exc)
        if isinstance(exc, KeyboardInterrupt):
            return True
        if isinstance(exc, CheckpointException):
            failures = [f[0] if isinstance(f, tuple) else f for f in exc.failures.values()]
            if any(_interrupted(f) for f in failures):
                return True
        exc = exc.__cause__ or exc.__context__
    return False


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _remove_leftovers(root: str) -> None:
    """Delete the ``global_step_<N>.tmp`` and ``global_step_<N>.old`` directories under ``root``: saves that a killed
    run left half-written and checkpoints it left half-deleted (a save is synchronous, so none is in progress),
    whatever their step (a resumed run with other ``save_steps`` would not write that step again, and each is up to
    a whole checkpoint's size)."""
    for name in os.listdir(root) if os.path.isdir(root) else ():
        if _LEFTOVER_STEP_DIR.match(name):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _delete_checkpoint(path: str) -> None:
    """Delete checkpoint ``path`` by renaming it to ``<path>.old`` first: gone at once for ``find_latest_checkpoint``,
    and if a kill cuts the deletion short, the next save deletes the rest (a half-deleted ``global_step_<N>`` is no
    complete checkpoint, so ``prune_checkpoints`` would never delete it)."""
    old = path + ".old"
    os.replace(path, old)
    shutil.rmtree(old)


def _write_checkpoint(
    final: str, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, extra_state: dict
) -> None:
    """Write the checkpoint under ``<final>.tmp`` and rename it to ``final`` once every rank has written its part."""
    tmp = final + ".tmp"
    if _rank() == 0:
        _remove_leftovers(os.path.dirname(final))
        os.makedirs(tmp)
    _barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=tmp)
    torch.save({**extra_state, "rng": rng_state()}, os.path.join(tmp, f"extra_state_rank{_rank()}.pt"))
    _barrier()
    if _rank() == 0:
        _write_manifest(tmp, step, _world_size())
        if os.path.isdir(final):  # an earlier save of the same step (an overwritten run): replace it. The old
            # one is renamed away and deleted after, so the step is missing only between two renames, not for as
            # long as a deletion takes
            old = final + ".old"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)


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

    A save that fails (a full disk, a directory that cannot be written) raises a ``RuntimeError`` naming the
    checkpoint and the cause, and leaves the checkpoints saved before it as they were; one cut short by Ctrl-C raises
    ``KeyboardInterrupt`` saying so. ``keep > 0`` then deletes the
    oldest earlier checkpoints beyond the newest ``keep`` (see ``prune_checkpoints``).
    """
    final = checkpoint_path(output_dir, step)
    try:
        _write_checkpoint(final, step, model, optimizer, extra_state)
    # DCP's failure is a BaseException: make it one that ``except Exception`` handlers see; torch.save's failures
    # are RuntimeErrors, most without the path
    except (CheckpointException, OSError, RuntimeError) as exc:
        if _interrupted(exc):
            raise KeyboardInterrupt(
                f"interrupted while saving checkpoint {final!r}; the checkpoints saved before it are kept"
            ) from exc
        cause = _dcp_failure(exc) if isinstance(exc, CheckpointException) else f"{type(exc).__name__}: {exc}"
        raise RuntimeError(
            f"saving checkpoint {final!r} failed ({cause}); the checkpoints saved before it are kept"
        ) from exc
    if keep > 0 and _rank() == 0:
        prune_checkpoints(output_dir, step, keep)
    _barrier()
    return final


def load_checkpoint(path: str, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """Load model and optimizer state from checkpoint ``path`` in place; return this rank's extra state
    (with RNG states already restored). Raises as ``check_checkpoint`` before anything is loaded."""
    check_checkpoint(path, world_size=_world_size())
    extra_file = os.path.join(path, f"extra_state_rank{_rank()}.pt")
    try:
        if optimizer is None:
            model_state = get_state_dict(model, [])[0]
            dcp.load({"model": model_state}, checkpoint_id=path)
            set_state_dict(model, [], model_state_dict=model_state, optim_state_dict={})
        else:
            model_state, optim_state = get_state_dict(model, optimizer)
            state = {"model": model_state, "optimizer": optim_state}
            dcp.load(state, checkpoint_id=path)
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    except CheckpointException as exc:  # a BaseException: make it one that ``except Exception`` handlers see
        raise ValueError(
            f"checkpoint {path!r} could not be loaded into this model ({_dcp_failure(exc)}): a checkpoint resumes "
            "with the model settings of the run that saved it (model.config_path, model.config_overrides; see that "
            "run's config.yaml); if they are the same, a file of it is damaged: resume from an earlier checkpoint"
        ) from exc
    try:
        extra = torch.load(extra_file, weights_only=True)
    except Exception as exc:
        raise ValueError(
            f"checkpoint {path!r}: {os.path.basename(extra_file)} cannot be read ({type(exc).__name__}, above): the "
            "file is damaged; resume from an earlier checkpoint"
        ) from exc
    set_rng_state(extra.pop("rng"))
    return extra
