"""The longest packed sequence one training step fits in GPU memory, with activation checkpointing, by GPU count.

All ranks form one Ulysses group (``ulysses_size = world size``; FSDP2 shards the parameters over the same ranks),
so N GPUs share one sequence. A 7B-shaped dense model (hidden 4096, 32 layers, 32 query / 8 KV heads, head_dim
128, FFN 11008, vocab 32000) trains with fp32 master weights, bf16 compute, AdamW and activation checkpointing.

Method (a binary search over 7B steps at 100k+ tokens would take minutes per probe):
1. one training step at ``L0`` and one at ``2 * L0`` tokens (the first also allocates the optimizer state) give
   the peak memory of each; with checkpointing the peak grows linearly in the sequence length, so the line
   through them predicts the length at which the peak reaches ``--fill`` of the GPU's memory;
2. a step at that length (rounded down to a multiple of 1024 * GPUs) verifies it; if it runs out of memory the
   length shrinks by 10% and is tried again (``--tries`` times).
Every rank holds the same share of the work, so all ranks run out of memory in the same step.

    python bench/max_seqlen.py                                   # one GPU
    torchrun --nproc_per_node=2 bench/max_seqlen.py              # two GPUs, SP=2
    torchrun --nproc_per_node=2 bench/max_seqlen.py --tiny       # CPU / gloo smoke run (no memory limit there)

Rank 0 prints the result and appends a JSON line to ``<results>/max_seqlen.jsonl``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import record  # noqa: E402
from veofast.distributed.parallel_state import init_parallel_state  # noqa: E402
from veofast.distributed.torch_parallelize import build_parallelize_model  # noqa: E402
from veofast.models import build_foundation_model  # noqa: E402
from veofast.optim import build_lr_scheduler, build_optimizer  # noqa: E402
from veofast.train_step import train_step  # noqa: E402

MODEL_7B = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 32000,
    "max_position_embeddings": 1 << 20,
    "tie_word_embeddings": False,
}
MODEL_TINY = {
    **MODEL_7B,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 256,
}


def predict_max_length(points: list[tuple[int, float]], capacity: float, multiple: int) -> int:
    """The length at which the line through two ``(length, peak bytes)`` points reaches ``capacity`` bytes,
    rounded down to ``multiple`` (at least ``multiple``). Raises ValueError if the peak does not grow."""
    (l0, p0), (l1, p1) = points
    slope = (p1 - p0) / (l1 - l0)
    if slope <= 0:
        raise ValueError(f"peak memory does not grow with the length: {points}")
    length = l1 + (capacity - p1) / slope
    return max(multiple, int(length) // multiple * multiple)


def micro_batch(length: int, vocab: int, seed: int) -> dict:
    """One packed document of ``length`` random tokens, as the packing collator makes it (host tensors)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, length), generator=gen)
    return {
        "input_ids": ids,
        "labels": ids.clone(),
        "position_ids": torch.arange(length)[None],
        "cu_seqlens": torch.tensor([0, length], dtype=torch.int32),
        "max_seqlen": length,
        "num_label_tokens": length - 1,
    }


class Trainer:
    """The model, optimizer and schedule of one run; ``step(length)`` -> peak bytes, or None when out of memory."""

    def __init__(self, hf: dict, ps):
        self.ps = ps
        model = build_foundation_model(config_overrides=hf, init_device="meta")
        self.config = model.config
        self.model = build_parallelize_model(
            model,
            enable_full_shard=True,
            enable_mixed_precision=True,
            enable_gradient_checkpointing=True,
            init_device="meta",
            ulysses_transport="nccl",  # the copy engines would keep a receive buffer as large as q's exchange
        )
        self.optimizer = build_optimizer(self.model, lr=1e-5)
        self.scheduler = build_lr_scheduler(self.optimizer, train_steps=100, lr_decay_style="constant")

    def step(self, length: int) -> float | None:
        cuda = self.ps.device.type == "cuda"
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            train_step(
                self.model,
                [micro_batch(length, self.config.vocab_size, seed=length)],
                self.optimizer,
                self.scheduler,
                config=self.config,
                ps=self.ps,
                max_grad_norm=1.0,
            )
        except torch.cuda.OutOfMemoryError:
            self.optimizer.zero_grad(set_to_none=True)
            return None
        return float(torch.cuda.max_memory_allocated()) if cuda else 0.0


def run(args) -> dict:
    cuda = torch.cuda.is_available() and not args.tiny
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if "WORLD_SIZE" in os.environ:  # under torchrun: a bounded timeout, so one failing rank cannot hang the rest
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=args.nccl_timeout))
    ps = init_parallel_state(ulysses_size=world, device_type="cuda" if cuda else "cpu")
    trainer = Trainer(MODEL_TINY if args.tiny else MODEL_7B, ps)
    multiple = 1024 * world if not args.tiny else 64 * world
    start = args.start or multiple * (8 if not args.tiny else 1)
    capacity = torch.cuda.get_device_properties(ps.device).total_memory * args.fill if cuda else None
    row = {
        "model": "tiny" if args.tiny else "7B-shaped dense, 32 layers",
        "gpus": world,
        "sp": world,
        "activation_checkpointing": True,
        "precision": "fp32 master + bf16 compute, AdamW",
    }
    points = []
    for length in (start, 2 * start):
        t0 = time.perf_counter()
        peak = trainer.step(length)
        if peak is None:
            row["error"] = f"out of memory already at {length} tokens"
            return row
        points.append((length, peak))
        row[f"peak_gib_at_{length}"] = peak / 2**30
        row[f"step_s_at_{length}"] = time.perf_counter() - t0
    if capacity is None:  # CPU: nothing to predict against; the two steps ran
        row["max_tokens"] = None
        return row
    length = predict_max_length(points, capacity, multiple)
    row["predicted_tokens"] = length
    for _ in range(args.tries):
        t0 = time.perf_counter()
        peak = trainer.step(length)
        if peak is not None:
            row.update(
                max_tokens=length,
                peak_gib=peak / 2**30,
                step_s=time.perf_counter() - t0,
                capacity_gib=capacity / args.fill / 2**30,
            )
            return row
        length = max(multiple, int(length * 0.9) // multiple * multiple)
    row["error"] = f"out of memory down to {length} tokens"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--start", type=int, default=None, help="first probe length (default 8192 per GPU)")
    parser.add_argument("--fill", type=float, default=0.95, help="share of GPU memory the prediction aims at")
    parser.add_argument("--tries", type=int, default=3, help="verification steps, each 10%% shorter")
    parser.add_argument("--tiny", action="store_true", help="tiny model on CPU/gloo (a smoke run of this script)")
    parser.add_argument("--nccl-timeout", type=int, default=600)
    args = parser.parse_args()
    code = 0
    try:
        row = run(args)
    except Exception as exc:  # noqa: BLE001 - recorded, then the process exits non-zero
        row, code = {"error": f"{type(exc).__name__}: {exc}"[:500]}, 1
    if not dist.is_initialized() or dist.get_rank() == 0:
        row = record("max_seqlen", row)
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
