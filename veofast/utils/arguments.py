"""Run configuration: dataclass schema, YAML file plus dotted command-line overrides, strict checking.

``parse_args(Arguments)`` reads ``python train.py config.yaml --train.lr 3e-4 --data.max_seq_len 4096``.
Every key in the YAML and on the command line must name a field; an unknown key or a value of the wrong
type is an ``ArgumentError`` that names the key and suggests the closest valid one. Custom arguments are
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from veofast.utils.logging import get_logger

logger = get_logger(__name__)


class ArgumentError(ValueError):
    """A configuration key or value that is not valid; the message names the key and where it came from."""


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
    datasets_type: Literal["mapping", "iterable"] = field(default="mapping")
    data_type: Literal["plaintext", "conversation"] = field(default="plaintext")
    text_keys: str | None = field(
        default=None, metadata={"help": "Record field with the text (default 'text') or messages ('messages')."}
    )
    chat_template: str = field(default="chatml", metadata={"help": "chatml, llama3, or tokenizer."})
    max_seq_len: int = field(default=2048)
    num_workers: int = field(default=0)
    drop_last: bool = field(default=True)
    pin_memory: bool = field(default=False)
    prefetch_factor: int | None = field(default=None)
    on_bad_record: Literal["raise", "skip"] = field(
        default="raise", metadata={"help": "A malformed record: raise, or skip it and count it in the logs."}
    )


@dataclass
class TrainingArguments:
    """How to train: parallelism, batch, optimizer, schedule, checkpoints, logging."""

    output_dir: str = field(default="outputs/run")
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Start anew in an output_dir that holds another run's checkpoints."}
    )
    # parallelism
    data_parallel_size: int = field(default=-1, metadata={"help": "-1: what the other axes leave."})
    data_parallel_mode: Literal["ddp", "fsdp1", "fsdp2"] = field(default="fsdp2")
    tensor_parallel_size: int = field(default=1)
    expert_parallel_size: int = field(default=1)
    pipeline_parallel_size: int = field(default=1)
    context_parallel_size: int = field(default=1)
    ulysses_parallel_size: int = field(default=1)
    ulysses_head_chunks: int = field(
        default=1,
        metadata={"help": "Chunks of whole GQA groups pipelined through the Ulysses all-to-alls (must divide the KV "
                  "heads per SP rank); 1: unchunked."},
    )
    ulysses_transport: Literal["auto", "nccl", "copy_engine"] = field(
        default="auto",
        metadata={"help": "What carries the Ulysses all-to-alls: the GPUs' copy engines (no SMs taken from the "
                  "attention they hide behind; SP ranks on one node) or NCCL. auto: copy engines when the SP group "
                  "is on one node."},
    )
    enable_full_shard: bool = field(default=True, metadata={"help": "ZeRO-3: reshard parameters after forward."})
    enable_mixed_precision: bool = field(default=True, metadata={"help": "bf16 compute, fp32 master weights."})
    enable_gradient_checkpointing: bool = field(default=False)
    enable_fsdp_offload: bool = field(default=False)
    init_device: Literal["meta", "cpu", "cuda"] = field(default="meta")
    compile: bool = field(default=False, metadata={"help": "torch.compile each decoder block."})
    global_load_balancing: bool = field(
        default=True, metadata={"help": "MoE load-balancing loss over all data-parallel ranks' micro-batches."}
    )
    # batch
    micro_batch_size: int = field(default=1)
    global_batch_size: int | None = field(default=None, metadata={"help": "Default: micro_batch_size * dp size."})
    dataloader_batch_size: int | None = field(
        default=None, metadata={"help": "Micro-batches per next(dataloader); derived, leave unset."}
    )
    rmpad: bool = field(default=False)
    rmpad_with_pos_ids: bool = field(default=True)
    dyn_bsz_margin: int = field(default=0)
    dyn_bsz_buffer_size: int = field(default=200)
    bsz_warmup_ratio: float = field(default=0.0)
    bsz_warmup_init_mbtoken: int = field(default=200)
    # optimization
    optimizer: Literal["adamw"] = field(default="adamw")
    lr: float = field(default=3e-4)
    lr_min: float = field(default=0.0)
    lr_warmup_ratio: float = field(default=0.0)
    lr_decay_style: Literal["constant", "linear", "cosine"] = field(default="cosine")
    lr_decay_ratio: float = field(default=1.0, metadata={"help": "Fraction of steps over which lr decays."})
    weight_decay: float = field(default=0.0)
    adam_beta1: float = field(default=0.9)
    adam_beta2: float = field(default=0.95)
    adam_eps: float = field(default=1e-8)
    max_grad_norm: float = field(default=1.0, metadata={"help": "Clip the global gradient norm; <= 0: off."})
    num_train_epochs: int = field(default=1)
    train_steps: int | None = field(default=None, metadata={"help": "Steps per epoch; computed when unset."})
    max_steps: int | None = field(default=None, metadata={"help": "Stop after this many steps in total."})
    seed: int = field(default=42)
    deterministic: bool = field(default=False, metadata={"help": "Deterministic algorithms (bitwise resume)."})
    max_bad_steps: int = field(default=5, metadata={"help": "Stop after this many non-finite losses in a row."})
    # checkpoints
    save_steps: int = field(default=0, metadata={"help": "Save every N steps (0: only at the end)."})
    save_hf_weights: bool = field(default=False, metadata={"help": "Also export HF safetensors at each save."})
    keep_checkpoints: int = field(default=0, metadata={"help": "Keep the newest N checkpoints (0: all)."})
    load_path: str | None = field(default=None, metadata={"help": "Checkpoint dir to resume from, or 'auto'."})
    # evaluation and logging
    eval_steps: int = field(default=0, metadata={"help": "Evaluate every N steps (needs data.eval_path)."})
    eval_batches: int = field(default=8, metadata={"help": "Loader steps (global batches) per evaluation."})
    log_steps: int = field(default=1)
    use_tensorboard: bool = field(default=False)
    use_wandb: bool = field(default=False)
    wandb_project: str = field(default="veofast")
    wandb_name: str | None = field(default=None)
    enable_profiling: bool = field(default=False)
    profile_start_step: int = field(default=1)
    profile_end_step: int = field(default=2)
    profile_trace_dir: str | None = field(default=None, metadata={"help": "Default: <output_dir>/trace."})
    profile_record_shapes: bool = field(default=True)
    profile_profile_memory: bool = field(default=True)
    profile_with_stack: bool = field(default=False)

    def __post_init__(self):
        self.global_rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        for name in ("micro_batch_size", "num_train_epochs", "ulysses_parallel_size", "ulysses_head_chunks",
                     "expert_parallel_size"):
            if getattr(self, name) < 1:
                raise ArgumentError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.rmpad and self.rmpad_with_pos_ids:
            raise ArgumentError("train.rmpad and train.rmpad_with_pos_ids are exclusive: set one of them")
        if self.profile_trace_dir is None:
            self.profile_trace_dir = os.path.join(self.output_dir, "trace")
        if self.data_parallel_size == -1:
            self.data_parallel_size = self.world_size // (self.ulysses_parallel_size * self.tensor_parallel_size) or 1
        if self.global_batch_size is None:
            self.global_batch_size = self.micro_batch_size * self.data_parallel_size
        dp_tokens = self.micro_batch_size * self.data_parallel_size
        if self.global_batch_size % dp_tokens:
            raise ArgumentError(
                f"train.global_batch_size {self.global_batch_size} must be a multiple of "
                f"micro_batch_size * data_parallel_size = {self.micro_batch_size} * {self.data_parallel_size}"
            )
        self.gradient_accumulation_steps = self.global_batch_size // dp_tokens
        self.dataloader_batch_size = self.gradient_accumulation_steps  # micro-batches per next(dataloader)

    def compute_train_steps(self, max_seq_len: int, train_size: int | None = None, dataset_length: int | None = None):
        """Set ``train_steps`` (steps per epoch) unless the config gave it.

        A mapping dataset of ``dataset_length`` samples gives ``dataset_length // global_batch_size`` steps
        with fixed batches; with dynamic batching (rmpad) a step holds about ``global_batch_size * max_seq_len``
        tokens, so an iterable dataset of ``train_size`` tokens gives ``train_size / that``.
        """
        if self.train_steps is not None:
            return self.train_steps
        dynamic = self.rmpad or self.rmpad_with_pos_ids
        if dataset_length is not None and not dynamic:
            steps = dataset_length // self.global_batch_size
        elif train_size is not None:
            steps = math.ceil(train_size / (self.global_batch_size * max_seq_len))
        else:
            raise ArgumentError("compute_train_steps needs train_size (tokens) or dataset_length")
        self.train_steps = max(1, steps)
        return self.train_steps


# ---------------------------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------------------------


def _suggest(key: str, valid: list[str], prefix: str) -> str:
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if match:
        return f"; did you mean '{prefix}{match[0]}'?"
    return f"; valid keys under '{prefix or 'top level'}': {', '.join(sorted(valid))}"


def _resolved_type_hints(cls) -> dict:
    return typing.get_type_hints(cls)


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
        if isinstance(value, str) and value.lower() in ("true", "1", "yes"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no"):
            return False
        raise ArgumentError(f"{where}: expected a bool, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ArgumentError(f"{where}: expected an int, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else int(value)
            except ValueError:
                pass
        raise ArgumentError(f"{where}: expected an int, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ArgumentError(f"{where}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, (dict, list)):
            raise ArgumentError(f"{where}: expected a string, got {value!r}")
        return str(value)
    if annotation in (dict, list) or origin in (dict, list):
        target = origin or annotation
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError as exc:
                raise ArgumentError(f"{where}: cannot parse {value!r} as YAML: {exc}") from exc
        if not isinstance(value, target):
            raise ArgumentError(f"{where}: expected a {target.__name__}, got {value!r}")
        return value
    return value


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ArgumentError(f"--{dotted}: '{part}' is not a section")
    node[parts[-1]] = value


def _parse_command_line(argv: list[str]) -> tuple[str | None, dict]:
    """Split ``[config.yaml] --a.b value --c.d=value ...`` into the YAML path and a tree of overrides."""
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
            _set_dotted(overrides, key, ("__cli__", value))
        elif config_path is None and token.endswith((".yaml", ".yml", ".json")):
            config_path = token
        else:
            raise ArgumentError(f"command line: unexpected argument {token!r} (options are written --section.key)")
        i += 1
    return config_path, overrides


def _from_command_line(value: Any) -> bool:
    if isinstance(value, tuple) and len(value) == 2 and value[0] == "__cli__":
        return True
    return isinstance(value, dict) and any(_from_command_line(v) for v in value.values())


def _build(cls, values: dict, prefix: str, origin: str):
    """Instantiate dataclass ``cls`` from ``values`` (possibly nested), strictly."""
    if not isinstance(values, dict):
        raise ArgumentError(f"{origin}: '{prefix or 'top level'}' must be a mapping, got {values!r}")
    hints = _resolved_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in values.items():
        where = f"{prefix}{key}"
        if key not in fields:
            source = "command line" if _from_command_line(value) else origin
            raise ArgumentError(f"{source}: unknown key '{where}'{_suggest(key, list(fields), prefix)}")
        annotation = hints[key]
        source = origin
        if isinstance(value, tuple) and _from_command_line(value):
            value, source = value[1], "command line"
        if dataclasses.is_dataclass(annotation):
            kwargs[key] = _build(annotation, value, f"{where}.", origin)
        else:
            kwargs[key] = _convert(value, annotation, f"{source}: {where}")
    try:
        return cls(**kwargs)
    except ArgumentError:
        raise
    except (TypeError, ValueError) as exc:
        raise ArgumentError(f"{origin}: {prefix.rstrip('.') or cls.__name__}: {exc}") from exc


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config_file(path: str) -> dict:
    """Read a YAML (or JSON) config file into a dict; errors name the file."""
    p = Path(path)
    if not p.is_file():
        raise ArgumentError(f"config file {path!r} does not exist")
    try:
        with open(p) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as exc:
        raise ArgumentError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ArgumentError(f"{path}: the top level must be a mapping of sections (model:, data:, train:)")
    return data


def parse_args(root_class, argv: list[str] | None = None):
    """Build ``root_class`` (a dataclass of argument sections) from a YAML file and dotted overrides.

    ``argv`` defaults to ``sys.argv[1:]``: an optional ``config.yaml`` then ``--section.key value`` pairs
    (``--section.key=value`` works too). Command-line values override the file's.
    """
    argv = sys.argv[1:] if argv is None else argv
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
    stem, suffix = os.path.splitext(path)
    index = 1
    while os.path.exists(f"{stem}.{index}{suffix}"):
        index += 1
    kept = f"{stem}.{index}{suffix}"
    os.replace(path, kept)
    return kept


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
