"""Run helpers: a task script's logger, the profiler, keeping an earlier run's files, seeding, and process exit that
is safe with gloo. VeOmni's names: ``create_logger``, ``create_profiler``, ``upload_trace``, ``set_seed``."""

from __future__ import annotations

import os
import random
import sys

import torch
import torch.distributed as dist

from .logging import RankLogger, get_logger, setup_logging

logger = get_logger(__name__)


def create_logger(name: str | None = None) -> RankLogger:
    """A task script's logger, as VeOmni's ``helper.create_logger(__name__)``: its ``info`` / ``info_rank0`` lines
    reach stderr (``setup_logging``: one handler for all of veofast, level ``VEOFAST_LOG_LEVEL``, default INFO)."""
    setup_logging()
    return get_logger(name or "veofast")


def create_profiler(
    start_step: int,
    end_step: int,
    trace_dir: str,
    record_shapes: bool = True,
    profile_memory: bool = False,
    with_stack: bool = False,
    *,
    first_step: int = 1,
) -> torch.profiler.profile:
    """A torch profiler that records steps ``[start_step, end_step)`` (1-based) and writes a Chrome/TensorBoard
    trace to ``trace_dir``; call ``.step()`` after every training step. ``first_step``: the step of the first
    ``.step()`` call (a resumed run's first step: the schedule counts from it). ``ValueError`` when the window is
    empty or ends before ``first_step``."""
    if not 1 <= start_step < end_step:
        raise ValueError(f"create_profiler: need 1 <= start_step < end_step, got {start_step}, {end_step}")
    if end_step <= first_step:
        raise ValueError(f"create_profiler: steps [{start_step}, {end_step}) end before the first step {first_step}")
    os.makedirs(trace_dir, exist_ok=True)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    rank = dist.get_rank() if dist.is_initialized() else 0

    def on_trace_ready(prof):
        prof.export_chrome_trace(os.path.join(trace_dir, f"trace_rank{rank}.json"))

    start = max(start_step, first_step) - first_step  # steps before the window, counted from first_step
    warmup = 1 if start >= 1 else 0  # the step before the window warms the profiler up when there is one
    return torch.profiler.profile(
        activities=activities,
        schedule=torch.profiler.schedule(
            wait=start - warmup, warmup=warmup, active=end_step - first_step - start, repeat=1
        ),
        on_trace_ready=on_trace_ready,
        record_shapes=record_shapes,
        profile_memory=profile_memory,
        with_stack=with_stack,
    )


def upload_trace(wandb_project: str | None, wandb_name: str | None, trace_dir: str) -> list[str]:
    """VeOmni's call after ``profiler.stop()``, which there copies the traces to the team's trace store. veofast has
    no trace store: the traces stay in ``trace_dir``. Logs that, and where they are, and returns their paths."""
    files = sorted(os.path.join(trace_dir, f) for f in os.listdir(trace_dir)) if os.path.isdir(trace_dir) else []
    if files:
        logger.warning(
            "upload_trace: veofast uploads no traces (wandb_project=%r, wandb_name=%r); they stay in %s: %s",
            wandb_project,
            wandb_name,
            trace_dir,
            ", ".join(os.path.basename(f) for f in files),
        )
    else:
        logger.warning(
            "upload_trace: no trace in %s (a trace is written when the profiler's schedule ends, after "
            "profile_end_step)",
            trace_dir,
        )
    return files


def move_aside(path: str) -> str:
    """Rename the file or directory ``path`` to the first free ``<stem>.<k><suffix>`` (``config.1.yaml``,
    ``config.2.yaml``, ..., ``checkpoints.1``) and return the new name: an earlier run's data is kept, not
    overwritten or appended to."""
    stem, suffix = os.path.splitext(path)
    index = 1
    while os.path.exists(f"{stem}.{index}{suffix}"):
        index += 1
    kept = f"{stem}.{index}{suffix}"
    os.replace(path, kept)
    return kept


def set_seed(seed: int, *, deterministic: bool = False) -> None:
    """Seed python and torch; ``deterministic`` also asks torch for deterministic algorithms."""
    random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def exit_process(code: int = 0) -> None:
    """Tear down torch.distributed, flush, and exit without interpreter teardown (gloo can abort there)."""
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
