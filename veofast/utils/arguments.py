"""Run configuration: dataclass schema, YAML file plus dotted command-line overrides, strict checking.

``parse_args(Arguments)`` reads ``python train.py config.yaml --train.lr 3e-4 --data.max_seq_len 4096``.
Every key in the YAML and on the command line must name a field, once; an unknown key, a key given twice, a value
of the wrong type or out of range is an ``ArgumentError`` that names the key and where it was set, and suggests the
closest valid key for an unknown one. A dict field's keys can be set one by one
(``--model.config_overrides.num_hidden_layers 4``), over the file's dict. Custom arguments are
added by subclassing the argument classes, exactly as in VeOmni:

    @dataclass
    class Arguments:
        model: ModelArguments = field(default_factory=ModelArguments)
        data: DataArguments = field(default_factory=DataArguments)
        train: TrainingArguments = field(default_factory=TrainingArguments)

    args = parse_args(Arguments)
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from veofast.utils.helper import move_aside
from veofast.utils.logging import get_logger

logger = get_logger(__name__)


class ArgumentError(ValueError):
    """A configuration key or value that is not valid; the message names the key and where it came from.

    ``key``: the field of the section being built that the error is about, when there is one; ``parse_args`` then
    adds where that key was set (the config file or the command line).
    """

    def __init__(self, message: str, *, key: str | None = None):
        super().__init__(message)
        self.key = key


def _require(ok: bool, section: str, name: str, value: Any, expected: str) -> None:
    """Raise an ``ArgumentError`` naming ``section.name`` unless ``ok``."""
    if not ok:
        raise ArgumentError(f"{section}.{name} must be {expected}, got {value!r}", key=name)


def _require_all(section: str, obj: Any, checks: dict[str, tuple[Callable[[Any], bool], str]]) -> None:
    """``checks``: field name -> (predicate on its value, what the value must be)."""
    for name, (predicate, expected) in checks.items():
        value = getattr(obj, name)
        _require(predicate(value), section, name, value, expected)


def _at_least(low: float) -> tuple[Callable[[Any], bool], str]:
    """A check for ``_require_all``: the value is at least ``low``."""
    return (lambda v: v >= low), f">= {low}"


def _none_or_at_least(low: float) -> tuple[Callable[[Any], bool], str]:
    """A check for ``_require_all``: the value is null (derived or unlimited) or at least ``low``."""
    return (lambda v: v is None or v >= low), f"null or >= {low}"


def _in_range(
    low: float, high: float, *, low_open: bool = False, high_open: bool = False
) -> tuple[Callable[[Any], bool], str]:
    """A check for ``_require_all``: the value lies in the interval from ``low`` to ``high`` (each end closed unless
    said open)."""

    def inside(v):
        return (v > low if low_open else v >= low) and (v < high if high_open else v <= high)

    return inside, f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def _expand_home(section: Any, *names: str) -> None:
    """``~`` at the start of the paths ``names`` of ``section`` is the user's home, as in a shell (which expands
    neither a YAML value nor ``--key=~/x``)."""
    for name in names:
        value = getattr(section, name)
        if isinstance(value, str):
            setattr(section, name, os.path.expanduser(value))


@dataclass
class ModelArguments:
    """What model to build and from where."""

    config_path: str | None = field(
        default=None, metadata={"help": "HF config.json (file or directory). Defaults to model_path."}
    )
    model_path: str | None = field(default=None, metadata={"help": "HF checkpoint directory (safetensors) to load."})
    tokenizer_path: str | None = field(default=None, metadata={"help": "Tokenizer directory. Defaults to model_path."})
    config_overrides: dict = field(
        default_factory=dict,
        metadata={"help": "HF config fields set over config_path's (or the whole config, with model_type)."},
    )
    ops_backend: Literal["auto", "triton", "torch"] = field(
        default="auto", metadata={"help": "Fused-op implementation: auto (Triton on CUDA), triton, or torch."}
    )
    basic_modules: list = field(default_factory=list, metadata={"help": "Extra module class names to FSDP-wrap."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow tokenizer code from the model dir."})

    def __post_init__(self):
        _expand_home(self, "config_path", "model_path", "tokenizer_path")
        if self.config_path is None:
            self.config_path = self.model_path
        if self.tokenizer_path is None:
            self.tokenizer_path = self.model_path


@dataclass
class DataArguments:
    """Where the data is and how it becomes token sequences."""

    train_path: str | None = field(default=None, metadata={"help": "JSONL/Parquet file, directory or glob."})
    eval_path: str | None = field(default=None, metadata={"help": "Validation data; evaluated every eval_steps."})
    train_size: int = field(default=10_000_000, metadata={"help": "Tokens to train on (iterable datasets)."})
    datasets_type: Literal["mapping", "iterable"] = field(
        default="mapping",
        metadata={"help": "mapping: records read into memory (small data); iterable: files streamed (large data)."},
    )
    data_type: Literal["plaintext", "conversation"] = field(
        default="plaintext",
        metadata={
            "help": "plaintext: pre-training, all tokens trained; conversation: chat messages, assistant turns trained."
        },
    )
    text_keys: str | None = field(
        default=None, metadata={"help": "Record field with the text (default 'text') or messages ('messages')."}
    )
    chat_template: str = field(
        default="chatml",
        metadata={"help": "chatml (alias qwen), llama3, or tokenizer (the tokenizer's own Jinja template)."},
    )
    max_seq_len: int = field(
        default=2048,
        metadata={"help": "Longest sample in tokens: longer texts are split (plaintext), conversations truncated."},
    )
    num_workers: int = field(default=0, metadata={"help": "Dataloader worker processes per rank; 0: the main process."})
    drop_last: bool = field(
        default=True, metadata={"help": "Kept for VeOmni configs: the loader is endless and drops nothing."}
    )
    pin_memory: bool = field(
        default=False, metadata={"help": "Pin micro-batches in host memory (faster copies to the GPU)."}
    )
    prefetch_factor: int | None = field(
        default=None, metadata={"help": "Micro-batches each worker prepares ahead (with num_workers > 0)."}
    )
    on_bad_record: Literal["raise", "skip"] = field(
        default="raise", metadata={"help": "A malformed record: raise, or skip it and count it in the logs."}
    )

    def __post_init__(self):
        _expand_home(self, "train_path", "eval_path")
        _require_all(
            "data",
            self,
            {
                # a label needs a token before it: a 1-token document has nothing to train
                "max_seq_len": _at_least(2),
                "train_size": _at_least(1),
                "num_workers": _at_least(0),
                "prefetch_factor": _none_or_at_least(1),
            },
        )
        from veofast.data.chat_template import TEMPLATES  # here: the data package imports torch

        _require(
            self.chat_template in TEMPLATES, "data", "chat_template", self.chat_template, f"one of {list(TEMPLATES)}"
        )


@dataclass
class TrainingArguments:
    """How to train: parallelism, batch, optimizer, schedule, checkpoints, logging."""

    output_dir: str = field(
        default="outputs/run", metadata={"help": "Where config.yaml, metrics.jsonl and checkpoints/ are written."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start anew in an output_dir that holds another run's checkpoints (kept as checkpoints.<k>)."
        },
    )
    # parallelism
    data_parallel_size: int = field(default=-1, metadata={"help": "-1: what the other axes leave."})
    data_parallel_mode: Literal["ddp", "fsdp1", "fsdp2"] = field(
        default="fsdp2", metadata={"help": "fsdp2: sharded parameters; ddp: replicated (fsdp1 is not supported)."}
    )
    tensor_parallel_size: int = field(
        default=1, metadata={"help": "Tensor-parallel mesh axis; build_parallelize_model does not implement TP."}
    )
    expert_parallel_size: int = field(
        default=1, metadata={"help": "Ranks the MoE experts are sliced over; must divide the world size."}
    )
    pipeline_parallel_size: int = field(default=1, metadata={"help": "Not implemented: 1."})
    context_parallel_size: int = field(default=1, metadata={"help": "Not implemented: 1 (use ulysses_parallel_size)."})
    ulysses_parallel_size: int = field(
        default=1,
        metadata={"help": "Ulysses sequence-parallel ranks each packed micro-batch is split over (needs rmpad*)."},
    )
    ulysses_head_chunks: int = field(
        default=1,
        metadata={
            "help": "Chunks of whole GQA groups pipelined through the Ulysses all-to-alls (must divide the KV "
            "heads per SP rank); 1: unchunked."
        },
    )
    ulysses_transport: Literal["auto", "nccl", "copy_engine"] = field(
        default="auto",
        metadata={
            "help": "What carries the Ulysses all-to-alls: the GPUs' copy engines (no SMs taken from the "
            "attention they hide behind; SP ranks on one node) or NCCL. auto: copy engines when the SP group "
            "is on one node."
        },
    )
    enable_full_shard: bool = field(default=True, metadata={"help": "ZeRO-3: reshard parameters after forward."})
    enable_mixed_precision: bool = field(default=True, metadata={"help": "bf16 compute, fp32 master weights."})
    enable_gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute each decoder layer's activations in backward (less memory)."}
    )
    enable_fsdp_offload: bool = field(
        default=False, metadata={"help": "Keep parameter shards and optimizer state on the CPU."}
    )
    init_device: Literal["meta", "cpu", "cuda"] = field(
        default="meta", metadata={"help": "Device the model is built on before it is parallelized."}
    )
    compile: bool = field(default=False, metadata={"help": "torch.compile each decoder block."})
    global_load_balancing: bool = field(
        default=True, metadata={"help": "MoE load-balancing loss over all data-parallel ranks' micro-batches."}
    )
    # batch
    micro_batch_size: int = field(
        default=1,
        metadata={
            "help": "Samples per micro-batch when padding; packed (rmpad*): micro_batch_size * max_seq_len tokens."
        },
    )
    global_batch_size: int | None = field(default=None, metadata={"help": "Default: micro_batch_size * dp size."})
    dataloader_batch_size: int | None = field(
        default=None, metadata={"help": "Micro-batches per next(dataloader); derived, leave unset."}
    )
    rmpad: bool = field(
        default=False, metadata={"help": "Pack samples into one row under the token budget, no padding."}
    )
    rmpad_with_pos_ids: bool = field(
        default=True, metadata={"help": "Pack as rmpad; documents start where position_ids restart at 0."}
    )
    dyn_bsz_margin: int = field(default=0, metadata={"help": "Tokens left free in each packed micro-batch."})
    dyn_bsz_buffer_size: int = field(
        default=200, metadata={"help": "Samples packed together (more: fuller micro-batches)."}
    )
    bsz_warmup_ratio: float = field(
        default=0.0, metadata={"help": "Fraction of train_steps over which the packed budget grows to the full one."}
    )
    bsz_warmup_init_mbtoken: int = field(
        default=200, metadata={"help": "Packed micro-batch token budget at the start of the warm-up."}
    )
    # optimization
    optimizer: Literal["adamw"] = field(default="adamw", metadata={"help": "veofast.optim.AdamW."})
    lr: float = field(default=3e-4, metadata={"help": "Peak learning rate."})
    lr_min: float = field(default=0.0, metadata={"help": "Learning rate at the end of the decay."})
    lr_start: float = field(default=0.0, metadata={"help": "Learning rate the warm-up rises from."})
    lr_warmup_ratio: float = field(
        default=0.0, metadata={"help": "Fraction of the steps over which lr rises linearly to its peak."}
    )
    lr_decay_style: Literal["constant", "linear", "cosine"] = field(
        default="cosine", metadata={"help": "Decay from lr to lr_min after the warm-up."}
    )
    lr_decay_ratio: float = field(
        default=1.0, metadata={"help": "Fraction of the steps after the warm-up over which lr decays to lr_min."}
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2."})
    adam_eps: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    max_grad_norm: float | None = field(
        default=1.0, metadata={"help": "Clip the global gradient norm; <= 0 or null: off."}
    )
    num_train_epochs: int = field(default=1, metadata={"help": "Epochs of train_steps steps each."})
    train_steps: int | None = field(default=None, metadata={"help": "Steps per epoch; computed when unset."})
    max_steps: int | None = field(default=None, metadata={"help": "Stop after this many steps in total."})
    seed: int = field(default=42, metadata={"help": "Seed of the model init, the torch RNG and the data order."})
    deterministic: bool = field(default=False, metadata={"help": "Deterministic algorithms (bitwise resume)."})
    max_bad_steps: int = field(
        default=5,
        metadata={
            "help": "Stop after this many non-finite steps (loss or grad norm) in a row; each is skipped: the "
            "weights and the lr schedule stay as they were."
        },
    )
    # checkpoints
    save_steps: int = field(default=0, metadata={"help": "Save every N steps (0: only at the end)."})
    save_hf_weights: bool = field(default=False, metadata={"help": "Also export HF safetensors at each save."})
    keep_checkpoints: int = field(default=0, metadata={"help": "Keep the newest N checkpoints (0: all)."})
    load_path: str | None = field(default=None, metadata={"help": "Checkpoint dir to resume from, or 'auto'."})
    # evaluation and logging
    eval_steps: int = field(default=0, metadata={"help": "Evaluate every N steps (needs data.eval_path)."})
    eval_batches: int = field(default=8, metadata={"help": "Loader steps (global batches) per evaluation."})
    log_steps: int = field(default=1, metadata={"help": "Write metrics every N steps."})
    use_tensorboard: bool = field(default=False, metadata={"help": "Also write metrics to <output_dir>/tensorboard."})
    use_wandb: bool = field(default=False, metadata={"help": "Also log metrics to Weights & Biases."})
    wandb_project: str = field(default="veofast", metadata={"help": "Weights & Biases project."})
    wandb_name: str | None = field(default=None, metadata={"help": "Weights & Biases run name."})
    enable_profiling: bool = field(
        default=False, metadata={"help": "Trace steps [profile_start_step, profile_end_step) with torch.profiler."}
    )
    profile_start_step: int = field(default=1, metadata={"help": "First traced step (1-based)."})
    profile_end_step: int = field(default=2, metadata={"help": "Step the trace stops before."})
    profile_trace_dir: str | None = field(default=None, metadata={"help": "Default: <output_dir>/trace."})
    profile_record_shapes: bool = field(default=True, metadata={"help": "Record op input shapes."})
    profile_profile_memory: bool = field(default=True, metadata={"help": "Record memory use."})
    profile_with_stack: bool = field(default=False, metadata={"help": "Record Python stacks."})

    def __post_init__(self):
        self.global_rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self._normalize()
        self._check_values()
        if self.rmpad and self.rmpad_with_pos_ids:
            raise ArgumentError("train.rmpad and train.rmpad_with_pos_ids are exclusive: set one of them", key="rmpad")
        if self.profile_trace_dir is None:
            self.profile_trace_dir = os.path.join(self.output_dir, "trace")
        if self.ulysses_parallel_size > 1 and not (self.rmpad or self.rmpad_with_pos_ids):
            raise ArgumentError(
                "train.ulysses_parallel_size > 1 splits packed micro-batches over its ranks: set "
                "train.rmpad_with_pos_ids (or train.rmpad) true",
                key="ulysses_parallel_size",
            )
        if self.ulysses_parallel_size == 1:
            for key, default in (("ulysses_transport", "auto"), ("ulysses_head_chunks", 1)):
                if getattr(self, key) != default:
                    raise ArgumentError(
                        f"train.{key} = {getattr(self, key)!r} applies only with train.ulysses_parallel_size > 1 "
                        "(it is 1): set that too, or leave this out",
                        key=key,
                    )
        if self.data_parallel_size == -1:
            self.data_parallel_size = self._derived_data_parallel_size()
        if self.global_batch_size is None:
            self.global_batch_size = self.micro_batch_size * self.data_parallel_size
        dp_tokens = self.micro_batch_size * self.data_parallel_size
        if self.global_batch_size % dp_tokens:
            raise ArgumentError(
                f"train.global_batch_size {self.global_batch_size} must be a multiple of "
                f"micro_batch_size * data_parallel_size = {self.micro_batch_size} * {self.data_parallel_size}",
                key="global_batch_size",
            )
        self.gradient_accumulation_steps = self.global_batch_size // dp_tokens
        if self.dataloader_batch_size not in (None, self.gradient_accumulation_steps):
            raise ArgumentError(
                f"train.dataloader_batch_size is derived (global_batch_size // (micro_batch_size * "
                f"data_parallel_size) = {self.gradient_accumulation_steps}); leave it unset, got "
                f"{self.dataloader_batch_size}",
                key="dataloader_batch_size",
            )
        self.dataloader_batch_size = self.gradient_accumulation_steps  # micro-batches per next(dataloader)

    def _normalize(self) -> None:
        """Other spellings to one: max_grad_norm null is 0 (no clipping); load_path "" is null (VeOmni's empty
        load_checkpoint_path: no checkpoint, and so the refusal to start over another run's checkpoints); ``~`` in a
        path is the home directory."""
        if self.max_grad_norm is None:
            self.max_grad_norm = 0.0
        if self.load_path == "":
            self.load_path = None
        _expand_home(self, "output_dir", "load_path", "profile_trace_dir")

    def _derived_data_parallel_size(self) -> int:
        """What ``data_parallel_size: -1`` means: the world size over the Ulysses and tensor-parallel sizes, which
        must divide it."""
        others = self.ulysses_parallel_size * self.tensor_parallel_size
        if self.world_size % others:
            raise ArgumentError(
                f"train.ulysses_parallel_size * train.tensor_parallel_size = {self.ulysses_parallel_size} * "
                f"{self.tensor_parallel_size} must divide the world size {self.world_size} (processes started)",
                key="ulysses_parallel_size",
            )
        return self.world_size // others

    def _check_values(self) -> None:
        """Every numeric setting within its range, so a bad value stops the run before anything starts."""
        positive = (lambda v: math.isfinite(v) and v > 0), "a finite number > 0"
        _require_all(
            "train",
            self,
            {
                **dict.fromkeys(
                    (
                        "micro_batch_size",
                        "num_train_epochs",
                        "tensor_parallel_size",
                        "expert_parallel_size",
                        "pipeline_parallel_size",
                        "context_parallel_size",
                        "ulysses_parallel_size",
                        "ulysses_head_chunks",
                        "log_steps",
                        "eval_batches",
                        "max_bad_steps",
                        "dyn_bsz_buffer_size",
                        "bsz_warmup_init_mbtoken",
                    ),
                    _at_least(1),
                ),
                **dict.fromkeys(("global_batch_size", "max_steps", "train_steps"), _none_or_at_least(1)),
                **dict.fromkeys(
                    ("save_steps", "eval_steps", "keep_checkpoints", "dyn_bsz_margin", "lr_min", "lr_start"),
                    _at_least(0),
                ),
                "weight_decay": ((lambda v: math.isfinite(v) and v >= 0), "a finite number >= 0"),
                # numpy's generators (data order) take seeds >= 0, torch's below 2**64
                "seed": ((lambda v: 0 <= v < 2**64), "in [0, 2**64)"),
                "data_parallel_size": ((lambda v: v == -1 or v >= 1), "-1 (what the other axes leave) or >= 1"),
                "lr": positive,
                "adam_eps": positive,
                "lr_warmup_ratio": _in_range(0.0, 1.0),
                "lr_decay_ratio": _in_range(0.0, 1.0, low_open=True),
                "bsz_warmup_ratio": _in_range(0.0, 1.0, high_open=True),
                "adam_beta1": _in_range(0.0, 1.0, high_open=True),
                "adam_beta2": _in_range(0.0, 1.0, high_open=True),
                "max_grad_norm": ((lambda v: not math.isnan(v)), "a number (<= 0: no clipping)"),
            },
        )
        _require(bool(self.output_dir), "train", "output_dir", self.output_dir, "a directory path")
        for key in ("lr_min", "lr_start"):
            _require(getattr(self, key) <= self.lr, "train", key, getattr(self, key), f"<= train.lr ({self.lr})")
        if self.enable_profiling:
            _require(
                1 <= self.profile_start_step < self.profile_end_step,
                "train",
                "profile_start_step",
                self.profile_start_step,
                f">= 1 and below train.profile_end_step ({self.profile_end_step})",
            )

    def compute_train_steps(self, max_seq_len: int, train_size: int | None = None, dataset_length: int | None = None):
        """Set ``train_steps`` (steps per epoch) unless the config gave it.

        A mapping dataset of ``dataset_length`` samples gives ``dataset_length // global_batch_size`` steps
        with fixed batches (a remainder that does not fill a step is logged: the endless loader gives it at the start
        of the next epoch; a dataset smaller than one global batch gives one step, logged too); with dynamic
        batching (rmpad) a step holds about ``global_batch_size * max_seq_len`` tokens, so an iterable dataset of
        ``train_size`` tokens gives ``train_size / that``.
        """
        if self.train_steps is not None:
            return self.train_steps
        dynamic = self.rmpad or self.rmpad_with_pos_ids
        if dataset_length is not None and not dynamic:
            steps = dataset_length // self.global_batch_size
            if not steps:
                logger.warning_rank0(
                    "compute_train_steps: %d samples are fewer than global_batch_size %d: each step of one per epoch "
                    "holds samples more than once",
                    dataset_length,
                    self.global_batch_size,
                )
            elif dataset_length % self.global_batch_size:
                logger.warning_rank0(
                    "compute_train_steps: %d samples / global_batch_size %d = %d step(s) per epoch: the last %d "
                    "samples of an epoch do not fill a step and come first in the next one (with num_train_epochs = 1 "
                    "they are not trained; set train.train_steps to choose)",
                    dataset_length,
                    self.global_batch_size,
                    steps,
                    dataset_length % self.global_batch_size,
                )
        elif train_size is not None:
            steps = math.ceil(train_size / (self.global_batch_size * max_seq_len))
        else:
            raise ArgumentError("compute_train_steps needs train_size (tokens) or dataset_length")
        self.train_steps = max(1, steps)
        return self.train_steps


# ---------------------------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------------------------


def _suggest(key: Any, valid: list[str], prefix: str) -> str:
    match = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.5)  # YAML keys may be numbers or bools
    if match:
        return f"; did you mean '{prefix}{match[0]}'?"
    return f"; valid keys under '{prefix or 'top level'}': {', '.join(sorted(valid))}"


def _resolved_type_hints(cls) -> dict:
    return typing.get_type_hints(cls)


# bools on the command line: YAML's spellings (a config file's ``on`` is true too), and 1 / 0
TRUE_SPELLINGS = ("true", "yes", "on", "1")
FALSE_SPELLINGS = ("false", "no", "off", "0")


def _convert(value: Any, annotation: Any, where: str) -> Any:
    """Check ``value`` against ``annotation``, converting strings from the command line; raise ArgumentError."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except ArgumentError as exc:
                errors.append(str(exc))
        raise ArgumentError(errors[0] if errors else f"{where}: cannot be {value!r}")
    if origin is Literal:
        if value not in args:
            raise ArgumentError(f"{where}: must be one of {list(args)}, got {value!r}")
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in TRUE_SPELLINGS:
            return True
        if isinstance(value, str) and value.lower() in FALSE_SPELLINGS:
            return False
        raise ArgumentError(f"{where}: expected a bool, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ArgumentError(f"{where}: expected an int, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):  # "42" exactly (int(float()) would round above 2**53), or "1e6"
            try:
                return int(value)
            except ValueError:
                pass
            try:
                number = float(value)
            except ValueError:
                number = None
            if number is not None and number.is_integer():
                return int(number)
        raise ArgumentError(f"{where}: expected an int, got {value!r}")
    if annotation is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # from the command line, or "1e-4", which PyYAML leaves as text
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None or math.isnan(number):
            raise ArgumentError(f"{where}: expected a number, got {value!r}")
        return number
    if annotation is str:
        # null and true/false are YAML's, not strings: str() would make them the text "None" or "True"
        if value is None or isinstance(value, (bool, dict, list)):
            raise ArgumentError(f"{where}: expected a string, got {value!r}")
        return str(value)
    if annotation in (dict, list) or origin in (dict, list):
        target = origin or annotation
        if isinstance(value, str):
            try:
                value = _load_yaml(value)
            except yaml.YAMLError as exc:
                raise ArgumentError(f"{where}: cannot parse {value!r} as YAML: {exc}") from exc
        if not isinstance(value, target):
            raise ArgumentError(f"{where}: expected a {target.__name__}, got {value!r}")
        return value
    return value


CLI_MARK = "__cli__"


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    twice = f"command line: --{dotted} is given twice (or together with its section or one of its keys); give it once"
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if _is_cli_leaf(node):  # --a.b VALUE, then --a.b.c VALUE
            raise ArgumentError(twice)
    if parts[-1] in node:
        raise ArgumentError(twice)
    node[parts[-1]] = value


def _parse_command_line(argv: list[str]) -> tuple[str | None, dict]:
    """Split ``[config.yaml] --a.b value --c.d=value ...`` into the YAML path and a tree of overrides."""
    if isinstance(argv, str) or not all(isinstance(token, str) for token in argv):
        raise TypeError(f"parse_args: argv must be a list of strings (as sys.argv[1:]), got {argv!r}")
    config_path = None
    overrides: dict = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        if token.startswith("--"):
            key, eq, value = token[2:].partition("=")
            if not key:
                raise ArgumentError(f"command line: empty option name in {token!r}")
            if not eq:
                if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                    raise ArgumentError(f"command line: --{key} needs a value (write --{key} true for a flag)")
                value = argv[i + 1]
                i += 1
            _set_dotted(overrides, key, (CLI_MARK, value))
        elif config_path is None and token.endswith((".yaml", ".yml", ".json")):
            config_path = token
        else:
            raise ArgumentError(f"command line: unexpected argument {token!r} (options are written --section.key)")
        i += 1
    return config_path, overrides


def _is_cli_leaf(value: Any) -> bool:
    return isinstance(value, tuple) and len(value) == 2 and value[0] == CLI_MARK


def _from_command_line(value: Any) -> bool:
    return _is_cli_leaf(value) or (isinstance(value, dict) and any(_from_command_line(v) for v in value.values()))


def _dict_from_command_line(value: dict, where: str) -> dict:
    """A dict field some of whose keys were set one by one (``--model.config_overrides.hidden_size 64``): those
    values parsed as YAML scalars, the file's other keys kept."""
    out = {}
    for key, item in value.items():
        if _is_cli_leaf(item):
            try:
                out[key] = _load_yaml(item[1])
            except yaml.YAMLError as exc:
                raise ArgumentError(f"command line: {where}.{key}: cannot parse {item[1]!r} as YAML: {exc}") from exc
        elif isinstance(item, dict):
            out[key] = _dict_from_command_line(item, f"{where}.{key}")
        else:
            out[key] = item
    return out


def _leaf_value(value: Any, annotation: Any, where: str) -> Any:
    """The value of the field ``where`` (not a section) with the command line's marks taken off."""
    if _is_cli_leaf(value):
        if annotation is str and value[1].lower() in ("null", "none"):  # as a file's null: no text, an error
            raise ArgumentError(
                f"command line: --{where} cannot be {value[1]} (it takes a string; for a path of that name write "
                f"./{value[1]})"
            )
        return value[1]
    if isinstance(value, dict) and _from_command_line(value):
        if annotation is dict or typing.get_origin(annotation) is dict:
            return _dict_from_command_line(value, where)
        key = next(k for k, v in value.items() if _from_command_line(v))
        raise ArgumentError(f"command line: unknown key '{where}.{key}': '{where}' is a setting, not a section")
    return value


def _build(cls, values: dict, prefix: str, origin: str):
    """Instantiate dataclass ``cls`` from ``values`` (possibly nested), strictly."""
    section = prefix.rstrip(".") or "top level"
    if not isinstance(values, dict):
        raise ArgumentError(f"{origin}: '{section}' must be a mapping, got {values!r}")
    hints = _resolved_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs, sources = {}, {}
    for key, value in values.items():
        where = f"{prefix}{key}"
        source = "command line" if _from_command_line(value) else origin
        if key not in fields:
            raise ArgumentError(f"{source}: unknown key '{where}'{_suggest(key, list(fields), prefix)}")
        sources[key] = source
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation):
            if _is_cli_leaf(value):
                raise ArgumentError(f"command line: '{where}' is a section: set its keys, as --{where}.KEY VALUE")
            kwargs[key] = _build(annotation, value, f"{where}.", origin)
        else:
            kwargs[key] = _convert(_leaf_value(value, annotation, where), annotation, f"{source}: {where}")
    try:
        return cls(**kwargs)
    except ArgumentError as exc:
        if exc.key in sources:  # the section's own checks: say where the offending key was set
            raise ArgumentError(f"{sources[exc.key]}: {exc}") from exc
        raise
    except (TypeError, ValueError) as exc:
        raise ArgumentError(f"{origin}: {section}: {exc}") from exc


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        first_lines: dict = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key, line = self.construct_object(key_node), key_node.start_mark.line + 1
            if key in first_lines:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {key!r} is given twice (lines {first_lines[key]} and {line})",
                    key_node.start_mark,
                )
            first_lines[key] = line
        return super().construct_mapping(node, deep=deep)


def _load_yaml(stream) -> Any:
    """Safe YAML loading that refuses duplicate keys."""
    return yaml.load(stream, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)


def load_config_file(path: str) -> dict:
    """Read a YAML (or JSON) config file into a dict; errors name the file."""
    p = Path(path)
    if not p.is_file():
        raise ArgumentError(f"config file {path!r} {'is not a file' if p.exists() else 'does not exist'}")
    try:
        with open(p) as f:
            data = _load_yaml(f) or {}
    except yaml.YAMLError as exc:
        raise ArgumentError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ArgumentError(f"{path}: the top level must be a mapping of sections (model:, data:, train:)")
    return data


def _type_name(annotation: Any) -> str:
    """How ``--help`` shows a field's type: ``int``, ``str | null``, ``{mapping,iterable}``."""
    if typing.get_origin(annotation) is Literal:
        return "{" + ",".join(map(str, typing.get_args(annotation))) + "}"
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(annotation))
    return getattr(annotation, "__name__", str(annotation))


def format_help(root_class) -> str:
    """Every key of ``root_class``'s sections with its type, default and help (what ``--help`` prints)."""
    lines = ["usage: [CONFIG.yaml] [--section.key VALUE ...]; every key, its type, default and meaning:"]

    def section(cls, prefix: str) -> None:
        hints = _resolved_type_hints(cls)
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            if dataclasses.is_dataclass(hints[f.name]):
                lines.append(f"\n{prefix}{f.name}:")
                section(hints[f.name], f"{prefix}{f.name}.")
                continue
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            lines.append(f"  --{prefix}{f.name} {_type_name(hints[f.name])} (default: {json.dumps(default)})")
            if f.metadata.get("help"):
                lines.append(f"      {f.metadata['help']}")

    section(root_class, "")
    return "\n".join(lines)


def parse_args(root_class, argv: list[str] | None = None):
    """Build ``root_class`` (a dataclass of argument sections) from a YAML file and dotted overrides.

    ``argv`` defaults to ``sys.argv[1:]``: an optional ``config.yaml`` then ``--section.key value`` pairs
    (``--section.key=value`` works too). Command-line values override the file's. ``-h``/``--help`` prints every
    key (``format_help``) and exits.
    """
    argv = sys.argv[1:] if argv is None else argv
    if not isinstance(argv, str) and any(token in ("-h", "--help") for token in argv):
        print(format_help(root_class))
        raise SystemExit(0)
    config_path, overrides = _parse_command_line(argv)
    file_values = load_config_file(config_path) if config_path else {}
    merged = _merge(file_values, overrides)
    return _build(root_class, merged, "", config_path or "arguments")


def to_dict(args) -> dict:
    """The resolved arguments as plain data (what ``save_args`` writes)."""
    return dataclasses.asdict(args)


def _keep_previous(path: str, text: str) -> str | None:
    """Move an existing ``path`` whose contents differ from ``text`` to the first free ``<stem>.<k><suffix>``
    (``config.1.yaml``, ``config.2.yaml``, ...) and return where it went; None when there was nothing to keep."""
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        if f.read() == text:
            return None
    return move_aside(path)


def save_args(args, output_dir: str, filename: str = "config.yaml") -> str:
    """Write the resolved arguments to ``output_dir/filename`` atomically; return the path.

    A different config already there (an earlier run of this output_dir, say the one a resumed run continues)
    is kept as ``config.<k>.yaml`` with the first free ``k`` rather than overwritten.
    """
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, filename)
    text = yaml.safe_dump(json.loads(json.dumps(to_dict(args), default=str)), sort_keys=False)
    kept = _keep_previous(path, text)
    if kept is not None:
        logger.info("save_args: %s held another config; kept it as %s", path, kept)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return path
