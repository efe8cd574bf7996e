"""The training loop's utilities, in process: lr schedules against a hand count (VeOmni's ``lr_start`` included),
the profiler's window in a resumed run, paths under ``~``, clipping turned off with null, a dataset smaller than a
global batch, the tokens and FLOPs of a padded step, a checkpoint save that fails, and the log level's
variable."""

import json
import logging
import os

import pytest
import torch

import veofast.checkpoint.checkpointer as checkpointer
from veofast.checkpoint import find_latest_checkpoint, list_checkpoints, save_checkpoint
from veofast.data.data_collator import DataCollatorWithPadding
from veofast.distributed.parallel_state import destroy_parallel_state, init_parallel_state
from veofast.models import build_foundation_model
from veofast.optim import build_lr_scheduler, build_optimizer
from veofast.train_step import train_step
from veofast.utils.arguments import (
    ArgumentError,
    DataArguments,
    ModelArguments,
    TrainingArguments,
    load_config_file,
)
from veofast.utils.flops import training_flops
from veofast.utils.helper import create_profiler
from veofast.utils.logging import setup_logging


def applied_lrs(steps, scheduler=None, **kwargs):
    """The lr each of ``steps`` optimizer steps applies (peak 1.0), from ``scheduler`` or one built of ``kwargs``."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = scheduler or build_lr_scheduler(optimizer, train_steps=steps, lr=1.0, **kwargs)
    lrs = []
    for _ in range(steps):
        lrs.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize(
    "style, decay",
    [
        ("constant", [1.0, 1.0, 1.0]),
        ("linear", [1.0, 0.1 + 0.9 * 2 / 3, 0.1 + 0.9 / 3]),
        ("cosine", [1.0, 0.1 + 0.9 * 0.75, 0.1 + 0.9 * 0.25]),
    ],
)
def test_schedule_against_a_hand_count(style, decay):
    """8 steps, 2 of warm-up from lr_start 0.2 (VeOmni's name, refused before), decay over half of the other 6 to
    lr_min 0.1, then lr_min (constant: the peak)."""
    after = [1.0] * 3 if style == "constant" else [0.1] * 3
    lrs = applied_lrs(8, lr_start=0.2, lr_warmup_ratio=0.25, lr_decay_style=style, lr_decay_ratio=0.5, lr_min=0.1)
    assert lrs == pytest.approx([0.2 + 0.8 / 2, 1.0, *decay, *after])


def test_veomni_call_and_its_edges():
    """VeOmni's task script's call, with its argument names (or positions); an lr_start above the peak or below 0
    is refused."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    train = TrainingArguments(lr=1.0, lr_min=0.5, lr_start=0.5, lr_warmup_ratio=0.5, lr_decay_style="linear")
    scheduler = build_lr_scheduler(
        optimizer,
        train_steps=4,
        lr=train.lr,
        lr_min=train.lr_min,
        lr_decay_style=train.lr_decay_style,
        lr_decay_ratio=train.lr_decay_ratio,
        lr_warmup_ratio=train.lr_warmup_ratio,
        lr_start=train.lr_start,
    )
    assert applied_lrs(4, scheduler) == pytest.approx([0.75, 1.0, 1.0, 0.75])
    positional = build_lr_scheduler(optimizer, 4, 1.0, "linear", 1.0, 0.5, 0.5, 0.5)  # VeOmni's order
    assert applied_lrs(4, positional) == pytest.approx([0.75, 1.0, 1.0, 0.75])
    for lr_start in (1.5, -0.1):
        with pytest.raises(ValueError, match="lr_start must be in"):
            build_lr_scheduler(optimizer, train_steps=4, lr_start=lr_start)
    with pytest.raises(ArgumentError, match=r"train.lr_start must be <= train.lr \(1.0\), got 2.0"):
        TrainingArguments(lr=1.0, lr_start=2.0)


def test_state_round_trip_mid_warmup():
    """A scheduler saved at step 2 of a 5-step warm-up and loaded into a fresh one applies the same lrs after."""
    kwargs = {"lr_warmup_ratio": 0.5, "lr_decay_style": "cosine", "lr_min": 0.2}
    whole = applied_lrs(10, **kwargs)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    first = build_lr_scheduler(optimizer, train_steps=10, **kwargs)
    assert applied_lrs(2, first) == whole[:2]
    second = build_lr_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), train_steps=10, **kwargs)
    second.load_state_dict(first.state_dict())
    assert applied_lrs(8, second) == pytest.approx(whole[2:])


def test_dataset_smaller_than_a_global_batch_is_logged(caplog, monkeypatch):
    """One step per epoch that repeats samples is said, not silent."""
    monkeypatch.setattr(logging.getLogger("veofast"), "propagate", True)  # setup_logging() may have turned it off
    train = TrainingArguments(micro_batch_size=2, global_batch_size=4, rmpad_with_pos_ids=False)
    with caplog.at_level(logging.WARNING, logger="veofast"):
        assert train.compute_train_steps(128, dataset_length=3) == 1
    assert "3 samples are fewer than global_batch_size 4: each step of one per epoch holds samples more" in caplog.text


def traced_steps(trace_dir, steps, **window):
    """The steps (of ``steps``, one ``.step()`` each) whose marker a profiler of ``window`` traced."""
    profiler = create_profiler(trace_dir=str(trace_dir), **window)
    profiler.start()
    for step in steps:
        with torch.profiler.record_function(f"train_step_{step}"):
            torch.randn(8, 8) @ torch.randn(8, 8)
        profiler.step()
    profiler.stop()
    with open(trace_dir / "trace_rank0.json") as f:
        names = {event["name"] for event in json.load(f)["traceEvents"]}
    return [step for step in steps if f"train_step_{step}" in names]


def test_profiler_window_counts_from_the_first_step(tmp_path):
    """A run resumed after step 2 traces its steps 4 and 5 for the window [4, 6); the schedule counted from the
    profiler's own first step, so it traced steps 6 and 7 (beyond the run) instead."""
    assert traced_steps(tmp_path / "fresh", range(1, 6), start_step=4, end_step=6) == [4, 5]
    assert traced_steps(tmp_path / "resumed", range(3, 6), start_step=4, end_step=6, first_step=3) == [4, 5]
    assert traced_steps(tmp_path / "inside", range(5, 8), start_step=4, end_step=7, first_step=5) == [5, 6]
    with pytest.raises(ValueError, match=r"steps \[1, 3\) end before the first step 3"):
        create_profiler(start_step=1, end_step=3, trace_dir=str(tmp_path), first_step=3)


def test_paths_under_home_are_expanded(monkeypatch, tmp_path):
    """``~`` in a path setting (a YAML value, which no shell expands) is the home directory; the run made a
    directory named ``~`` in the working directory, or did not find the model or data there."""
    monkeypatch.setenv("HOME", str(tmp_path))
    model = ModelArguments(model_path="~/ckpt", config_overrides={"model_type": "llama"})
    assert (model.model_path, model.config_path, model.tokenizer_path) == (str(tmp_path / "ckpt"),) * 3
    data = DataArguments(train_path="~/d/*.jsonl", eval_path="~/e.jsonl")
    assert (data.train_path, data.eval_path) == (str(tmp_path / "d" / "*.jsonl"), str(tmp_path / "e.jsonl"))
    train = TrainingArguments(output_dir="~/run", load_path="~/run/checkpoints/global_step_2")
    assert train.output_dir == str(tmp_path / "run")
    assert train.load_path == str(tmp_path / "run" / "checkpoints" / "global_step_2")
    assert train.profile_trace_dir == str(tmp_path / "run" / "trace")
    assert TrainingArguments(load_path="auto", profile_trace_dir="~/t").profile_trace_dir == str(tmp_path / "t")
    assert TrainingArguments(load_path="auto").load_path == "auto"


def test_null_max_grad_norm_and_empty_load_path():
    """``max_grad_norm: null`` is no clipping, as 0 (it was refused as not a number); ``load_path: ""`` is no
    checkpoint, as null (tasks/train.py's refusal to start over another run's checkpoints looks for null)."""
    train = TrainingArguments(max_grad_norm=None, load_path="")
    assert (train.max_grad_norm, train.load_path) == (0.0, None)


def test_config_path_that_is_a_directory_is_named(tmp_path):
    (tmp_path / "c.yaml").mkdir()
    with pytest.raises(ArgumentError, match="c.yaml' is not a file"):
        load_config_file(str(tmp_path / "c.yaml"))


@pytest.fixture
def single_process():
    destroy_parallel_state()
    yield init_parallel_state(device_type="cpu")
    destroy_parallel_state()


REAL_TORCH_SAVE = torch.save


def fail_torch_save(obj, f, *args, **kwargs):
    """torch.save, failing as it does on a read-only directory for a file path (DCP saves into buffers)."""
    if isinstance(f, str):
        raise RuntimeError("[enforce fail at inline_container.cc:747] . open file failed with strerror: Read-only")
    return REAL_TORCH_SAVE(obj, f, *args, **kwargs)


def fail_manifest(*args, **kwargs):
    raise PermissionError(13, "Permission denied")


@pytest.mark.parametrize(
    "target, failure, cause",
    [
        ("torch.save", fail_torch_save, "RuntimeError: .*open file failed with strerror: Read-only"),
        ("_write_manifest", fail_manifest, "PermissionError: .*Permission denied"),
    ],
)
def test_failed_save_keeps_the_earlier_checkpoints(tmp_path, single_process, monkeypatch, target, failure, cause):
    """A save whose extra state or manifest cannot be written (a directory made read-only, a full disk) raises an
    error naming the checkpoint and the cause, and prunes nothing; the error was torch's or the OS's own, without
    the checkpoint it was about."""
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    for step in (1, 2):
        save_checkpoint(str(tmp_path), step, model, optimizer, {"global_step": step}, keep=2)
    monkeypatch.setattr(
        checkpointer if target == "_write_manifest" else checkpointer.torch, target.split(".")[-1], failure
    )
    with pytest.raises(
        RuntimeError,
        match=f"saving checkpoint '.*global_step_3' failed \\({cause}\\); the checkpoints saved before it are kept",
    ):
        save_checkpoint(str(tmp_path), 3, model, optimizer, {"global_step": 3}, keep=2)
    assert [step for step, _ in list_checkpoints(str(tmp_path))] == [1, 2]
    assert find_latest_checkpoint(str(tmp_path)) == os.path.join(tmp_path, "checkpoints", "global_step_2")


def test_log_level_in_any_case_and_a_bad_one_named(monkeypatch):
    """``VEOFAST_LOG_LEVEL=debug`` works (it was a bare "Unknown level: 'debug'" at the import of tasks/train.py);
    a value that is no level is named with the variable, before any handler is installed."""
    root = logging.getLogger("veofast")
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(root, "propagate", root.propagate)
    level = root.level
    try:
        monkeypatch.setenv("VEOFAST_LOG_LEVEL", "bogus")
        with pytest.raises(ValueError, match="VEOFAST_LOG_LEVEL='bogus' is not a logging level"):
            setup_logging()
        assert root.handlers == []
        monkeypatch.setenv("VEOFAST_LOG_LEVEL", "debug")
        setup_logging()
        assert root.level == logging.DEBUG and len(root.handlers) == 1
    finally:
        root.setLevel(level)


def test_padded_step_counts_the_real_tokens(single_process):
    """tokens (and so tokens/s) and the FLOPs of MFU count the documents' tokens, not the padding."""
    config = {
        "model_type": "llama",
        "vocab_size": 32,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
    }
    model = build_foundation_model(config_overrides=config, init_device="cpu", ops_backend="torch")
    optimizer = build_optimizer(model)
    batch = DataCollatorWithPadding()(
        [{"input_ids": list(range(1, n + 1)), "labels": list(range(1, n + 1))} for n in (5, 9)]
    )
    result = train_step(
        model,
        [batch],
        optimizer,
        build_lr_scheduler(optimizer, train_steps=1),
        config=model.config,
        ps=single_process,
        max_grad_norm=1.0,
    )
    assert (result.tokens, result.label_tokens) == (14, 12)
    assert result.flops == training_flops(model.config, [5, 9])
