"""Train a tiny model a few steps on packed micro-batches of given document lengths; rank 0 writes the results.

Usage: torchrun ... short_batch_worker.py OUT_JSON MODEL_TYPE LENGTHS [key=value ...]  (``LENGTHS``: documents of
each micro-batch, e.g. ``1/2,1`` is two micro-batches, one document of 1 token, then documents of 2 and 1; keys:
sp, ep, kv (KV heads)). Every rank takes every micro-batch (the data-parallel ranks too: their mean loss is one
rank's, their label count ``dp`` times one rank's).
"""

import json
import sys

import torch
from train_steps_worker import TINY, packed_micro_batch
from worker_exit import run_and_exit

from veofast.distributed.parallel_state import init_parallel_state
from veofast.distributed.torch_parallelize import build_parallelize_model
from veofast.models import build_foundation_model
from veofast.optim import build_lr_scheduler, build_optimizer
from veofast.train_step import train_step


def main():
    out_path, model_type, lengths, *options = sys.argv[1:]
    opts = dict(o.split("=", 1) for o in options)
    ps = init_parallel_state(ep_size=int(opts.get("ep", 1)), ulysses_size=int(opts.get("sp", 1)), device_type="cpu")
    overrides = {**TINY[model_type], "num_key_value_heads": int(opts.get("kv", 2))}
    model = build_foundation_model(config_overrides=overrides, init_device="meta", ops_backend="torch")
    config = model.config
    model = build_parallelize_model(model, init_device="meta", seed=0)
    optimizer = build_optimizer(model, lr=1e-2, weight_decay=0.1)
    scheduler = build_lr_scheduler(optimizer, train_steps=10, lr_decay_style="constant")
    generator = torch.Generator().manual_seed(0)
    results = []
    for _ in range(2):
        micro_batches = [packed_micro_batch([int(n) for n in mb.split(",")], config.vocab_size, generator)
                         for mb in lengths.split("/")]
        result = train_step(model, micro_batches, optimizer, scheduler, config=config, ps=ps, max_grad_norm=1.0)
        results.append({"loss": result.loss, "grad_norm": result.grad_norm, "label_tokens": result.label_tokens,
                        "skipped": result.skipped})
    if ps.global_rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    run_and_exit(main)
