"""Argument parsing: YAML + dotted overrides, subclassing, strict errors, derived values, saving."""

from dataclasses import dataclass, field

import pytest
import yaml

from veofast.utils.arguments import (
    ArgumentError,
    DataArguments,
    ModelArguments,
    TrainingArguments,
    parse_args,
    save_args,
)


@dataclass
class Arguments:
    model: ModelArguments = field(default_factory=ModelArguments)
    data: DataArguments = field(default_factory=DataArguments)
    train: TrainingArguments = field(default_factory=TrainingArguments)


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"config_overrides": {"model_type": "llama", "hidden_size": 64}},
        "data": {"train_path": "x.jsonl", "max_seq_len": 512},
        "train": {"lr": 1e-3, "micro_batch_size": 2, "global_batch_size": 8},
    }))
    return str(path)


def test_yaml_and_overrides(config_file):
    args = parse_args(Arguments, [config_file, "--train.lr", "3e-4", "--data.max_seq_len=4096",
                                  "--train.enable_full_shard", "false", "--model.config_overrides", "{num_experts: 4}"])
    assert args.train.lr == 3e-4
    assert args.data.max_seq_len == 4096
    assert args.train.enable_full_shard is False
    assert args.model.config_overrides == {"num_experts": 4}  # a CLI value replaces the whole field
    assert args.train.gradient_accumulation_steps == 4  # 8 / (2 * 1 rank)
    assert args.train.dataloader_batch_size == 4


def test_subclass_adds_arguments(config_file):
    @dataclass
    class CustomTrainingArguments(TrainingArguments):
        enable_xxx: bool = field(default=False, metadata={"help": "custom"})

    @dataclass
    class CustomArguments:
        model: ModelArguments = field(default_factory=ModelArguments)
        data: DataArguments = field(default_factory=DataArguments)
        train: CustomTrainingArguments = field(default_factory=CustomTrainingArguments)

    args = parse_args(CustomArguments, [config_file, "--train.enable_xxx", "true"])
    assert args.train.enable_xxx is True and args.train.lr == 1e-3
    with pytest.raises(ArgumentError, match="enable_xxx"):
        parse_args(Arguments, [config_file, "--train.enable_xxx", "true"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--train.lrr", "1"], r"unknown key 'train.lrr'; did you mean 'train.lr'"),
        (["--trian.lr", "1"], r"unknown key 'trian'; did you mean 'train'"),
        (["--train.lr", "fast"], r"train.lr: expected a number"),
        (["--train.micro_batch_size", "1.5"], r"train.micro_batch_size: expected an int"),
        (["--train.rmpad", "maybe"], r"train.rmpad: expected a bool"),
        (["--train.lr_decay_style", "exp"], r"train.lr_decay_style: must be one of"),
        (["--train.lr"], r"--train.lr needs a value"),
        (["stray"], r"unexpected argument 'stray'"),
        (["--train.global_batch_size", "3"], r"global_batch_size 3 must be a multiple"),
        (["--train.rmpad", "true", "--train.rmpad_with_pos_ids", "true"], r"exclusive"),
        (["--train.ulysses_head_chunks", "0"], r"train.ulysses_head_chunks must be >= 1, got 0"),
        (["--train.ulysses_transport", "ring"], r"train.ulysses_transport: must be one of"),
    ],
)
def test_bad_command_line(config_file, argv, message):
    with pytest.raises(ArgumentError, match=message):
        parse_args(Arguments, [config_file, *argv])


def test_unknown_yaml_key_names_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  learning_rate: 0.1\n")
    with pytest.raises(ArgumentError, match=r"bad.yaml: unknown key 'train.learning_rate'"):
        parse_args(Arguments, [str(path)])
    path.write_text("train:\n  lr: [1, 2]\n")
    with pytest.raises(ArgumentError, match=r"train.lr: expected a number"):
        parse_args(Arguments, [str(path)])
    with pytest.raises(ArgumentError, match="does not exist"):
        parse_args(Arguments, [str(tmp_path / "missing.yaml")])


def test_compute_train_steps():
    train = TrainingArguments(micro_batch_size=2, global_batch_size=4, rmpad_with_pos_ids=False)
    assert train.compute_train_steps(128, dataset_length=41) == 10
    dyn = TrainingArguments(micro_batch_size=2, global_batch_size=4, rmpad_with_pos_ids=True)
    assert dyn.compute_train_steps(1000, train_size=40_001) == 11
    fixed = TrainingArguments(train_steps=7)
    assert fixed.compute_train_steps(1000, train_size=1) == 7


def test_save_args_round_trip(tmp_path, config_file):
    args = parse_args(Arguments, [config_file])
    path = save_args(args, str(tmp_path / "out"))
    again = parse_args(Arguments, [path])
    assert again.train.lr == args.train.lr and again.model.config_overrides == args.model.config_overrides


def test_save_args_keeps_a_different_earlier_config(tmp_path, config_file):
    """A resumed run with other arguments keeps the earlier config.yaml as config.1.yaml; the same config is
    written over in place."""
    out = str(tmp_path / "out")
    first = parse_args(Arguments, [config_file])
    save_args(first, out)
    save_args(first, out)
    assert not (tmp_path / "out" / "config.1.yaml").exists()
    resumed = parse_args(Arguments, [config_file, "--train.max_steps", "20", "--train.load_path", "auto"])
    save_args(resumed, out)
    assert parse_args(Arguments, [str(tmp_path / "out" / "config.1.yaml")]).train.max_steps is None
    assert parse_args(Arguments, [str(tmp_path / "out" / "config.yaml")]).train.max_steps == 20
