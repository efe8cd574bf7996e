"""Argument parsing: YAML + dotted overrides, subclassing, strict errors, derived values, saving."""

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

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
    path.write_text(
        yaml.safe_dump(
            {
                "model": {"config_overrides": {"model_type": "llama", "hidden_size": 64}},
                "data": {"train_path": "x.jsonl", "max_seq_len": 512},
                "train": {"lr": 1e-3, "micro_batch_size": 2, "global_batch_size": 8},
            }
        )
    )
    return str(path)


def test_yaml_and_overrides(config_file):
    args = parse_args(
        Arguments,
        [
            config_file,
            "--train.lr",
            "3e-4",
            "--data.max_seq_len=4096",
            "--train.enable_full_shard",
            "false",
            "--model.config_overrides",
            "{num_experts: 4}",
        ],
    )
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
        (["--train.ulysses_transport", "nccl"], r"train.ulysses_transport = 'nccl' applies only with train.ulysses"),
        (["--train.ulysses_head_chunks", "2"], r"train.ulysses_head_chunks = 2 applies only with train.ulysses_para"),
        (["--train.ulysses_transport", "ring"], r"train.ulysses_transport: must be one of"),
        (["--train.lr", "1", "--train.lr", "2"], r"--train.lr is given twice"),
        (["--train.lr", "1", "--train", "{lr: 2}"], r"--train is given twice"),
        (
            ["--model.config_overrides", "{a: 1}", "--model.config_overrides.b", "2"],
            r"--model.config_overrides.b is given twice \(or together with its section",
        ),
        (["--train.lr.x", "1"], r"unknown key 'train.lr.x': 'train.lr' is a setting, not a section"),
        (["--train", "5"], r"command line: 'train' is a section: set its keys, as --train.KEY VALUE"),
        (["--train.lr", "-1"], r"command line: train.lr must be a finite number > 0, got -1.0"),
        (["--train.lr", "nan"], r"command line: train.lr: expected a number, got 'nan'"),
        (["--train.max_grad_norm", "nan"], r"train.max_grad_norm: expected a number"),
        (["--train.lr_warmup_ratio", "1.5"], r"train.lr_warmup_ratio must be in \[0.0, 1.0\], got 1.5"),
        (["--train.lr_decay_ratio", "0"], r"train.lr_decay_ratio must be in \(0.0, 1.0\]"),
        (["--train.lr_min", "0.1"], r"train.lr_min must be <= train.lr"),
        (["--train.adam_beta2", "1"], r"train.adam_beta2 must be in \[0.0, 1.0\)"),
        (["--train.max_steps", "0"], r"command line: train.max_steps must be null or >= 1, got 0"),
        (["--train.global_batch_size", "0"], r"train.global_batch_size must be null or >= 1, got 0"),
        (["--train.log_steps", "0"], r"train.log_steps must be >= 1, got 0"),
        (["--train.save_steps", "-1"], r"train.save_steps must be >= 0, got -1"),
        (["--train.data_parallel_size", "0"], r"train.data_parallel_size must be -1 .* or >= 1, got 0"),
        (["--train.tensor_parallel_size", "0"], r"train.tensor_parallel_size must be >= 1, got 0"),
        (["--train.dataloader_batch_size", "7"], r"train.dataloader_batch_size is derived .* = 4\); leave it unset"),
        (["--train.output_dir="], r"train.output_dir must be a directory path"),
        (["--train.output_dir", "null"], r"--train.output_dir cannot be null \(it takes a string; .* write ./null\)"),
        (["--data.max_seq_len", "1"], r"command line: data.max_seq_len must be >= 2, got 1"),
        (["--data.num_workers", "-1"], r"data.num_workers must be >= 0, got -1"),
        (["--data.chat_template", "alpaca"], r"command line: data.chat_template must be one of \['chatml', "),
        (["--train.seed", "-1"], r"command line: train.seed must be in \[0, 2\*\*64\), got -1"),
        (["--train.weight_decay", "inf"], r"train.weight_decay must be a finite number >= 0, got inf"),
        (
            ["--train.ulysses_parallel_size", "2"],
            r"ulysses_parallel_size \* train.tensor_parallel_size = 2 \* 1 must "
            r"divide the world size 1",
        ),
        (
            ["--train.ulysses_parallel_size", "2", "--train.rmpad_with_pos_ids", "false"],
            r"ulysses_parallel_size > 1 splits packed micro-batches .* set train.rmpad_with_pos_ids",
        ),
    ],
)
def test_bad_command_line(config_file, argv, message):
    with pytest.raises(ArgumentError, match=message):
        parse_args(Arguments, [config_file, *argv])


@pytest.mark.parametrize(
    "argv, key, value",
    [
        (["--train.rmpad_with_pos_ids", "off"], "train.rmpad_with_pos_ids", False),  # YAML's spellings, as in a file
        (["--train.enable_full_shard", "On"], "train.enable_full_shard", True),
        (["--train.compile", "1"], "train.compile", True),
        (["--train.seed", "12345678901234567891"], "train.seed", 12345678901234567891),  # exactly, not via float
        (["--data.train_size", "1e10"], "data.train_size", 10**10),
        (["--data.max_seq_len", "4096.0"], "data.max_seq_len", 4096),
        (["--train.global_batch_size", "null"], "train.global_batch_size", 2),  # derived: micro_batch_size * 1 rank
        (["--data.text_keys", "None"], "data.text_keys", None),
        (["--model.basic_modules", "[A, B]"], "model.basic_modules", ["A", "B"]),
        (["--train.wandb_name", "123"], "train.wandb_name", "123"),
    ],
)
def test_command_line_values(config_file, argv, key, value):
    section, name = key.split(".")
    got = getattr(getattr(parse_args(Arguments, [config_file, *argv]), section), name)
    assert got == value and type(got) is type(value)


def test_help_lists_every_key(capsys):
    """``--help`` prints every key with its type, default and help, and exits; every field has a help text."""
    with pytest.raises(SystemExit) as exit_info:
        parse_args(Arguments, ["--train.lr", "1", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for section, cls in (("model", ModelArguments), ("data", DataArguments), ("train", TrainingArguments)):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{section}.{f.name} has no help text"
            assert f"--{section}.{f.name} " in text and f.metadata["help"] in text
    assert '--data.datasets_type {mapping,iterable} (default: "mapping")' in text


@pytest.mark.parametrize("config", sorted(p.name for p in (Path(__file__).parents[2] / "configs").glob("*.yaml")))
def test_shipped_configs_parse(config):
    parse_args(Arguments, [str(Path(__file__).parents[2] / "configs" / config)])


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


@pytest.mark.parametrize(
    "text, message",
    [
        ("train:\n  lr: 0.1\n  seed: 1\n  lr: 0.2\n", r"key 'lr' is given twice \(lines 2 and 4\)"),
        ("train:\n  lr: 0.1\ndata:\n  max_seq_len: 8\ntrain:\n  seed: 1\n", r"key 'train' is given twice"),
        ("train:\n  output_dir: null\n", r"bad.yaml: train.output_dir: expected a string, got None"),
        ("train:\n  output_dir: yes\n", r"bad.yaml: train.output_dir: expected a string, got True"),
        ("train:\n  lr_warmup_ratio: 1.5\n", r"bad.yaml: train.lr_warmup_ratio must be in \[0.0, 1.0\], got 1.5"),
        ("train:\n", r"bad.yaml: 'train' must be a mapping, got None"),
        ("train:\n  1: 2\n", r"bad.yaml: unknown key 'train.1'; valid keys under 'train.'"),
        ("on: 1\n", r"bad.yaml: unknown key 'True'"),  # YAML reads the key ``on`` as a bool
    ],
)
def test_bad_yaml_names_file_and_key(tmp_path, text, message):
    """A key given twice (PyYAML would keep the last silently), null or a bool for a string, a value out of range:
    the error names the file and the key."""
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ArgumentError, match=message):
        parse_args(Arguments, [str(path)])


def test_yaml_scientific_notation_and_dotted_dict_keys(tmp_path):
    """``1e-4`` (a string to PyYAML) is a number; a dict field's keys set one by one on the command line are merged
    over the file's dict, their values parsed as YAML."""
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  config_overrides: {model_type: llama, hidden_size: 64}\ntrain:\n  lr: 1e-4\n")
    args = parse_args(
        Arguments,
        [
            str(path),
            "--model.config_overrides.hidden_size",
            "32",
            "--model.config_overrides.rope_scaling",
            "{type: linear, factor: 2.0}",
        ],
    )
    assert args.train.lr == 1e-4
    assert args.model.config_overrides == {
        "model_type": "llama",
        "hidden_size": 32,
        "rope_scaling": {"type": "linear", "factor": 2.0},
    }


def test_argv_must_be_a_list(config_file):
    with pytest.raises(TypeError, match="argv must be a list of strings"):
        parse_args(Arguments, config_file)


def test_compute_train_steps(caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("veofast"), "propagate", True)  # setup_logging() may have turned it off
    train = TrainingArguments(micro_batch_size=2, global_batch_size=4, rmpad_with_pos_ids=False)
    with caplog.at_level(logging.WARNING, logger="veofast"):
        assert train.compute_train_steps(128, dataset_length=41) == 10
    assert "41 samples / global_batch_size 4 = 10 step(s) per epoch: the last 1 samples" in caplog.text
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
