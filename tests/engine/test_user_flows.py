"""End-to-end user flows: a VeOmni task script ported by renaming, fine-tuning a Hugging Face checkpoint with the
training entry point and loading its export back into transformers, and settings a CPU machine cannot honour
refused up front with a message that names the remedy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from dist_launch import REPO, torchrun

from veofast.models import build_config, build_foundation_model
from veofast.utils.arguments import DataArguments, ModelArguments, TrainingArguments, parse_args

# A Qwen3 config of the size of the shipped tokenizer's vocabulary (1024).
TINY_QWEN3 = dict(
    model_type="qwen3",
    architectures=["Qwen3ForCausalLM"],
    vocab_size=1024,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)


def cpu_env() -> dict:
    return {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p),
    }


def save_tiny_checkpoint(path, **overrides) -> None:
    """A random transformers Qwen3 checkpoint (config.json + model.safetensors), made by transformers itself."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    torch.manual_seed(0)
    config = Qwen3Config(
        **{k: v for k, v in {**TINY_QWEN3, **overrides}.items() if k not in ("model_type", "architectures")}
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(path)


# ----------------------------------------------------------------------------- the VeOmni guide's task script

# The snippets of the VeOmni best-practice guide, assembled into one script, with `veomni` replaced by `veofast`.
GUIDE_SCRIPT = """
from dataclasses import dataclass, field
from functools import partial

from veofast.data import build_dataloader, build_iterative_dataset, build_mapping_dataset
from veofast.data.chat_template import build_chat_template
from veofast.data.data_transform import process_pretrain_example, process_sft_example
from veofast.distributed.parallel_state import get_parallel_state, init_parallel_state
from veofast.distributed.torch_parallelize import build_parallelize_model
from veofast.models import build_foundation_model, build_tokenizer
from veofast.optim import build_lr_scheduler, build_optimizer
from veofast.utils import helper
from veofast.utils.arguments import DataArguments, ModelArguments, TrainingArguments, parse_args

logger = helper.create_logger(__name__)


@dataclass
class CustomTrainingArguments(TrainingArguments):
    enable_xxx: bool = field(default=False, metadata={"help": "Enable me if necessary."})


@dataclass
class Arguments:
    model: "ModelArguments" = field(default_factory=ModelArguments)
    data: "DataArguments" = field(default_factory=DataArguments)
    train: "CustomTrainingArguments" = field(default_factory=CustomTrainingArguments)


args = parse_args(Arguments)
init_parallel_state(
    dp_size=args.train.data_parallel_size, tp_size=args.train.tensor_parallel_size,
    ep_size=args.train.expert_parallel_size, pp_size=args.train.pipeline_parallel_size,
    cp_size=args.train.context_parallel_size, ulysses_size=args.train.ulysses_parallel_size,
    dp_mode=args.train.data_parallel_mode,
)
parallel_state = get_parallel_state()
print(parallel_state.dp_mesh, parallel_state.dp_group, parallel_state.sp_group, parallel_state.sp_rank,
      parallel_state.tp_group, parallel_state.tp_mesh)
tokenizer = build_tokenizer(args.model.tokenizer_path)
if args.data.data_type == "conversation":
    chat_template = build_chat_template(args.data.chat_template, tokenizer)
    transform = partial(process_sft_example, chat_template=chat_template, max_seq_len=args.data.max_seq_len)
else:
    transform = partial(process_pretrain_example, tokenizer=tokenizer, max_seq_len=args.data.max_seq_len)
if args.data.datasets_type == "iterable":
    logger.info_rank0("Start building iterative dataset")
    train_dataset = build_iterative_dataset(args.data.train_path, transform=transform, seed=args.train.seed)
    args.train.compute_train_steps(args.data.max_seq_len, args.data.train_size)
else:
    train_dataset = build_mapping_dataset(data_path=args.data.train_path, transform=transform)
    args.train.compute_train_steps(args.data.max_seq_len, args.data.train_size, len(train_dataset))
train_dataloader = build_dataloader(
    dataset=train_dataset, micro_batch_size=args.train.micro_batch_size,
    global_batch_size=args.train.global_batch_size, dataloader_batch_size=args.train.dataloader_batch_size,
    seed=args.train.seed, max_seq_len=args.data.max_seq_len, collate_fn=None, train_steps=args.train.train_steps,
    rmpad=args.train.rmpad, rmpad_with_pos_ids=args.train.rmpad_with_pos_ids,
    bsz_warmup_ratio=args.train.bsz_warmup_ratio, bsz_warmup_init_mbtoken=args.train.bsz_warmup_init_mbtoken,
    dyn_bsz_margin=args.train.dyn_bsz_margin, dyn_bsz_buffer_size=args.train.dyn_bsz_buffer_size,
    num_workers=args.data.num_workers, drop_last=args.data.drop_last, pin_memory=args.data.pin_memory,
    prefetch_factor=args.data.prefetch_factor,
)
model = build_foundation_model(
    config_path=args.model.config_path, weights_path=args.model.model_path, init_device=args.train.init_device
)
model = build_parallelize_model(
    model, enable_full_shard=args.train.enable_full_shard, enable_mixed_precision=args.train.enable_mixed_precision,
    enable_gradient_checkpointing=args.train.enable_gradient_checkpointing, init_device=args.train.init_device,
    enable_fsdp_offload=args.train.enable_fsdp_offload,
    basic_modules=model._no_split_modules + args.model.basic_modules,
)
optimizer = build_optimizer(model, lr=args.train.lr, weight_decay=args.train.weight_decay)
lr_scheduler = build_lr_scheduler(optimizer, train_steps=args.train.train_steps * args.train.num_train_epochs)
if args.train.global_rank == 0:
    if args.train.enable_profiling:
        profiler = helper.create_profiler(
            start_step=args.train.profile_start_step, end_step=args.train.profile_end_step,
            trace_dir=args.train.profile_trace_dir, record_shapes=args.train.profile_record_shapes,
            profile_memory=args.train.profile_profile_memory, with_stack=args.train.profile_with_stack,
        )
        profiler.start()
global_step = 0
for epoch in range(args.train.num_train_epochs):
    data_iterator = iter(train_dataloader)
    for _ in range(args.train.max_steps):
        micro_batches = next(data_iterator)
        for micro_batch in micro_batches:
            loss = model(**micro_batch).loss / len(micro_batches)
            loss.backward()
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        global_step += 1
        logger.info_rank0("step %d loss %.4f", global_step, loss.item())
        if args.train.global_rank == 0 and args.train.enable_profiling:  # (the guide's snippet omits this test)
            profiler.step()
            if global_step == args.train.profile_end_step:
                profiler.stop()
                helper.upload_trace(args.train.wandb_project, args.train.wandb_name, args.train.profile_trace_dir)
"""


def test_guide_task_script_runs_renamed(tmp_path):
    """Every name of the guide's snippets exists in veofast and the script trains, as one plain process; the
    script's own logger prints (helper.create_logger) and upload_trace says where the trace stayed."""
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.json").write_text(json.dumps(TINY_QWEN3))
    script = tmp_path / "train_guide.py"
    script.write_text(GUIDE_SCRIPT)
    trace_dir = tmp_path / "trace"
    command = [
        sys.executable,
        str(script),
        "--model.config_path",
        str(tmp_path / "config"),
        "--model.tokenizer_path",
        "tokenizers/tiny",
        "--data.train_path",
        "data/tiny/train.jsonl",
        "--data.max_seq_len",
        "128",
        "--train.max_steps",
        "2",
        "--train.output_dir",
        str(tmp_path / "out"),
        "--train.enable_profiling",
        "true",
        "--train.profile_end_step",
        "2",
        "--train.profile_trace_dir",
        str(trace_dir),
        "--train.enable_xxx",
        "true",
    ]
    proc = subprocess.run(command, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "step 1 loss" in proc.stderr and "step 2 loss" in proc.stderr, proc.stderr[-2000:]
    assert "upload_trace: veofast uploads no traces" in proc.stderr and str(trace_dir) in proc.stderr
    assert os.listdir(trace_dir)


def test_upload_trace_without_a_trace_says_so(tmp_path):
    from veofast.utils import helper

    assert helper.upload_trace("project", None, str(tmp_path / "none")) == []
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "trace_rank0.json").write_text("{}")
    assert helper.upload_trace("project", "run", str(tmp_path / "t")) == [str(tmp_path / "t" / "trace_rank0.json")]


# ------------------------------------------------------------------------- fine-tuning a Hugging Face checkpoint


@dataclass
class Arguments:
    model: ModelArguments = field(default_factory=ModelArguments)
    data: DataArguments = field(default_factory=DataArguments)
    train: TrainingArguments = field(default_factory=TrainingArguments)


def test_config_overrides_that_change_the_checkpoint_are_named_with_the_remedy(tmp_path):
    """configs/sft.yaml's overrides (a tiny MoE trained from scratch) with a user's checkpoint: the weight load's
    refusal leads with the overridden keys and the remedy; without them, or with overrides that keep every weight's
    shape, the checkpoint's model is built."""
    ckpt = str(tmp_path / "ckpt")
    save_tiny_checkpoint(ckpt)
    args = parse_args(Arguments, ["configs/sft.yaml", "--model.model_path", ckpt])
    with pytest.raises(
        ValueError,
        match=r"^model.config_overrides change .*model_type: 'qwen3' -> 'qwen3_moe'.*"
        r"--model\.config_overrides '\{\}'(.|\n)*missing keys",
    ):
        build_foundation_model(
            config_path=args.model.config_path,
            weights_path=args.model.model_path,
            config_overrides=args.model.config_overrides,
            init_device="cpu",
        )
    args = parse_args(Arguments, ["configs/sft.yaml", "--model.model_path", ckpt, "--model.config_overrides", "{}"])
    model = build_foundation_model(
        config_path=args.model.config_path,
        weights_path=args.model.model_path,
        config_overrides=args.model.config_overrides,
        init_device="cpu",
    )
    assert model.config.model_type == "qwen3" and not model.config.is_moe
    # overrides that change no weight's shape are the checkpoint's business (RoPE base, a value it already has)
    model = build_foundation_model(
        weights_path=ckpt, config_overrides={"rope_theta": 5e5, "hidden_size": 64}, init_device="cpu"
    )
    assert model.config.rope_theta == 5e5


def finetune_step1_reference(ckpt: str, argv: list[str], world_size: int) -> float:
    """transformers' loss of ``ckpt`` on the global batch of step 1 that tasks/train.py builds from ``argv``: the
    sum over every rank's label tokens over their count, one document at a time."""
    from transformers import AutoModelForCausalLM

    from veofast.data import build_data_transform, build_dataloader, build_mapping_dataset
    from veofast.models import build_tokenizer

    old = os.environ.get("WORLD_SIZE")
    os.environ["WORLD_SIZE"] = str(world_size)  # the data-parallel size the run derived
    try:
        args = parse_args(Arguments, argv)
    finally:
        os.environ.pop("WORLD_SIZE") if old is None else os.environ.__setitem__("WORLD_SIZE", old)
    transform = build_data_transform(
        args.data.data_type,
        tokenizer=build_tokenizer(args.model.tokenizer_path),
        max_seq_len=args.data.max_seq_len,
        chat_template=args.data.chat_template,
    )
    dataset = build_mapping_dataset(args.data.train_path, transform=transform)
    args.train.compute_train_steps(args.data.max_seq_len, args.data.train_size, len(dataset))
    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    total, count = 0.0, 0
    for rank in range(world_size):
        loader = build_dataloader(
            dataset,
            micro_batch_size=args.train.micro_batch_size,
            global_batch_size=args.train.global_batch_size,
            seed=args.train.seed,
            max_seq_len=args.data.max_seq_len,
            train_steps=args.train.train_steps,
            rmpad_with_pos_ids=args.train.rmpad_with_pos_ids,
            dp_rank=rank,
            dp_size=world_size,
        )
        for micro_batch in next(iter(loader)):
            bounds = micro_batch["cu_seqlens"].tolist()
            for start, end in zip(bounds[:-1], bounds[1:]):
                labels = micro_batch["labels"][0, start + 1 : end]
                with torch.no_grad():
                    logits = hf(input_ids=micro_batch["input_ids"][:, start:end]).logits[0, :-1]
                total += F.cross_entropy(logits.double(), labels, ignore_index=-100, reduction="sum").item()
                count += int((labels != -100).sum())
    return total / count


@pytest.mark.slow
def test_finetune_hf_checkpoint_on_two_processes_and_load_the_export(tmp_path):
    """torchrun tasks/train.py configs/sft.yaml --model.model_path CKPT on 2 processes with save_hf_weights: the
    step-1 loss is transformers' loss of CKPT on the same batch, and transformers and veofast load the export to the
    same logits."""
    from transformers import AutoModelForCausalLM

    ckpt, out = str(tmp_path / "ckpt"), tmp_path / "out"
    save_tiny_checkpoint(ckpt)
    argv = [
        "configs/sft.yaml",
        "--model.model_path",
        ckpt,
        "--model.tokenizer_path",
        "tokenizers/tiny",
        "--model.config_overrides",
        "{}",
        "--data.max_seq_len",
        "256",
    ]
    torchrun(
        "tasks/train.py",
        *argv,
        "--train.max_steps",
        "1",
        "--train.save_hf_weights",
        "true",
        "--train.output_dir",
        str(out),
        timeout=240,
    )
    with open(out / "metrics.jsonl") as f:
        step1 = json.loads(f.readline())["loss"]
    assert step1 == pytest.approx(finetune_step1_reference(ckpt, argv, world_size=2), rel=1e-5)

    export = str(out / "checkpoints" / "global_step_1" / "hf")
    ids = torch.randint(0, 1024, (2, 29), generator=torch.Generator().manual_seed(1))
    hf = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    ours = build_foundation_model(weights_path=export, init_device="cpu", ops_backend="torch").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, hf(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        before = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)(input_ids=ids).logits
    assert not torch.allclose(before, hf(input_ids=ids).logits)  # the export holds the trained weights


# --------------------------------------------------------------------- settings a CPU machine cannot honour


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_triton_ops_backend_refused_up_front_without_cuda(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="model.ops_backend 'triton'.*use 'auto'"):
        build_config(None, config_overrides=TINY_QWEN3, ops_backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter runs the kernels on the CPU (the tests do)
    assert build_config(None, config_overrides=TINY_QWEN3, ops_backend="triton").ops_backend == "triton"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_init_device_cuda_refused_without_cuda():
    with pytest.raises(ValueError, match="init_device 'cuda' but there is no CUDA device"):
        build_foundation_model(config_overrides=TINY_QWEN3, init_device="cuda")
