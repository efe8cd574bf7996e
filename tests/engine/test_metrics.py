"""metrics.jsonl: strict JSON lines; a resumed run appends to its file, a fresh run in the same output_dir keeps the
earlier file. The FLOPs that MFU is computed from."""

import importlib.util
import json
import math

import pytest
from torch import nn

from veofast.models import build_foundation_model
from veofast.utils import metrics
from veofast.utils.flops import matmul_params, training_flops
from veofast.utils.metrics import MetricsWriter


def write_steps(output_dir, steps, *, resume):
    writer = MetricsWriter(str(output_dir), enabled=True, resume=resume)
    for step in steps:
        writer.write({"step": step, "loss": 1.0 / step})
    writer.close()


def steps_in(path):
    with open(path) as f:
        return [json.loads(line)["step"] for line in f]


def test_fresh_run_keeps_earlier_metrics_and_resume_appends(tmp_path):
    write_steps(tmp_path, [1, 2, 3], resume=False)
    write_steps(tmp_path, [4, 5], resume=True)  # the same run, resumed
    assert steps_in(tmp_path / "metrics.jsonl") == [1, 2, 3, 4, 5]
    write_steps(tmp_path, [1, 2], resume=False)  # another run from scratch (overwrite_output_dir)
    assert steps_in(tmp_path / "metrics.jsonl") == [1, 2]
    assert steps_in(tmp_path / "metrics.1.jsonl") == [1, 2, 3, 4, 5]


def test_non_finite_numbers_are_written_as_null(tmp_path):
    """A skipped step's NaN loss and infinite grad norm give a line that strict JSON readers accept."""
    writer = MetricsWriter(str(tmp_path), enabled=True)
    writer.write({"step": 1, "loss": math.nan, "grad_norm": math.inf, "lr": 1e-3, "skipped": True})
    writer.close()
    line = (tmp_path / "metrics.jsonl").read_text()

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    record = json.loads(line, parse_constant=refuse)
    assert record == {"step": 1, "loss": None, "grad_norm": None, "lr": 1e-3, "skipped": True}


@pytest.mark.parametrize(
    "overrides",
    [
        {"model_type": "llama", "tie_word_embeddings": True},
        {"model_type": "qwen3_moe", "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
         "mlp_only_layers": [0], "decoder_sparse_step": 2, "head_dim": 8},
        {"model_type": "qwen2_moe", "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
         "shared_expert_intermediate_size": 48},
    ],
)
def test_training_flops_match_a_count_of_the_built_model(overrides):
    """MFU's FLOPs: 6 per matmul weight and token (every Linear, the LM head even when tied, the active top-k share
    of the expert stacks), plus 6 * heads * head_dim * n^2 per layer and document of n tokens (causal attention)."""
    config = {"vocab_size": 97, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4,
              "num_attention_heads": 4, "num_key_value_heads": 2, **overrides}
    model = build_foundation_model(config_overrides=config, init_device="cpu", ops_backend="torch")
    cfg = model.config
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    experts = sum(p.numel() for p in model.parameters() if p.dim() == 3)  # (experts, out, in) stacks
    weights = linear + experts * cfg.num_experts_per_tok // cfg.num_experts if cfg.is_moe else linear
    assert matmul_params(cfg) == weights
    lengths = [5, 17, 1]
    attention = 6 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * (5**2 + 17**2 + 1**2)
    assert training_flops(cfg, lengths) == 6 * weights * 23 + attention


@pytest.mark.parametrize("setting", ["use_tensorboard", "use_wandb"])
def test_a_logger_that_is_not_installed_is_named(tmp_path, monkeypatch, setting):
    """A missing package is a ValueError naming the setting, from the writer and before it opens anything."""
    package = {"use_tensorboard": "tensorboard", "use_wandb": "wandb"}[setting]
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(metrics.importlib.util, "find_spec", lambda name: None if name == package else find_spec(name))
    with pytest.raises(ValueError, match=f"train.{setting}: {package} is not installed"):
        MetricsWriter(str(tmp_path / "out"), enabled=True, **{setting: True})
    assert not (tmp_path / "out").exists()
