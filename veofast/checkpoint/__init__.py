"""Checkpoints: DCP save/resume of the whole training state (HF export lives in veofast.models.hf_io)."""

from .checkpointer import (
    check_checkpoint,
    checkpoint_path,
    find_latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    move_aside_checkpoints,
    save_checkpoint,
)

__all__ = [
    "check_checkpoint",
    "checkpoint_path",
    "find_latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "move_aside_checkpoints",
    "save_checkpoint",
]
