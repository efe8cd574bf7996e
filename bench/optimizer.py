"""The optimizer step on real model shapes: veofast's Triton AdamW against torch's fused and foreach AdamW.

For each model (the parameter shapes of ``bench/train.py``'s models, fp32, random gradients) and provider, in one
process: the median time of ``step()`` (GPU time between CUDA events, the launches queued behind a sleep so the
host's launch time is not counted) and the bytes an AdamW must move over that time (28 per fp32 parameter: read
parameter, gradient and both moments, write parameter and moments). The ``+clip`` rows time what the training
loop does after the backward: the global gradient norm, the clipping and the update; veofast passes the clipping
factor into its update (``step(grad_scale=...)``), torch's AdamW needs the gradients scaled in memory first
(``clip_grad_norm``).

    python bench/optimizer.py [--models dense,moe] [--repeats 10] [--quick]
    TRITON_INTERPRET=1 python bench/optimizer.py --smoke   # CPU, a tiny model: checks that everything runs
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import print_table, record, time_ms  # noqa: E402
from bench.train import LLAMA_1B, moe_config  # noqa: E402
from veofast.distributed.grad_norm import clip_coefficient, clip_grad_norm, total_grad_norm  # noqa: E402
from veofast.models import build_foundation_model  # noqa: E402
from veofast.optim import AdamW  # noqa: E402

SUITE = "optimizer"
BYTES_PER_PARAM = 28
HYPER = dict(lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
TINY = dict(
    LLAMA_1B,
    vocab_size=101,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
)


def model_parameters(hf: dict, device: torch.device) -> list[nn.Parameter]:
    """fp32 parameters of the model's shapes (built on the meta device, then allocated), each with a gradient."""
    model = build_foundation_model(config_overrides=hf, init_device="meta")
    gen = torch.Generator(device=device).manual_seed(0)
    params = []
    for p in model.parameters():
        param = nn.Parameter(torch.randn(p.shape, device=device, generator=gen) * 0.02)
        param.grad = torch.randn(p.shape, device=device, generator=gen) * 1e-3
        params.append(param)
    return params


def providers(device: torch.device) -> dict[str, Callable[[list], torch.optim.Optimizer]]:
    found = {"veofast": lambda ps: AdamW(ps, **HYPER, backend="triton")}
    if device.type == "cuda":
        found["torch-fused"] = lambda ps: torch.optim.AdamW(ps, **HYPER, fused=True)
    found["torch-foreach"] = lambda ps: torch.optim.AdamW(ps, **HYPER, foreach=True)
    return found


def clipped_step(name: str, params: list, optimizer: torch.optim.Optimizer) -> Callable[[], None]:
    """The training loop's norm, clip and update (``veofast.train_step``) for this provider."""
    holder = nn.Module()
    holder.params = nn.ParameterList(params)

    def step() -> None:
        if name == "veofast":
            norm = total_grad_norm(params)
            optimizer.step(grad_scale=clip_coefficient(norm, 1.0))
        else:
            clip_grad_norm(holder, 1.0)
            optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="dense,moe", help="comma-separated subset of dense,moe")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="the dense model only, 5 repeats")
    parser.add_argument("--smoke", action="store_true", help="CPU, a tiny dense model")
    args = parser.parse_args()
    if args.quick:
        args.models, args.repeats = "dense", 5
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("bench/optimizer.py needs a CUDA GPU (or --smoke with TRITON_INTERPRET=1)")
    device = torch.device("cpu" if args.smoke else "cuda")
    models = {"dense": ("llama-3.2-1b", LLAMA_1B), "moe": ("qwen3-30b-a3b-4l", moe_config(4))}
    unknown = sorted(set(filter(None, args.models.split(","))) - set(models))
    if unknown:
        parser.error(f"--models: unknown {', '.join(unknown)}; choose from {', '.join(models)}")
    plan = [("tiny", TINY)] if args.smoke else [models[m] for m in args.models.split(",") if m]
    rows = []
    for model_name, hf in plan:
        params = model_parameters(hf, device)
        numel = sum(p.numel() for p in params)
        for name, build in providers(device).items():
            optimizer = build(params)
            for mode, fn in (("step", optimizer.step), ("+clip", clipped_step(name, params, optimizer))):
                ms = time_ms(fn, warmup=2, repeats=1 if args.smoke else args.repeats)
                row = dict(model=model_name, params=numel, provider=name, mode=mode, ms=ms)
                row["tb_per_s"] = numel * BYTES_PER_PARAM / ms / 1e9
                rows.append(record(SUITE, row))
            del optimizer
        del params
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print_table(rows, ["model", "params", "provider", "mode", "ms", "tb_per_s"])


if __name__ == "__main__":
    main()
