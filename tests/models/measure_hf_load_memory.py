"""Peak host memory of ``load_hf_weights`` into an FSDP2-sharded model (a script, not a test).

``python tests/models/measure_hf_load_memory.py [--nproc 2] [--dir DIR]`` writes a ~0.9 GB Qwen3-MoE checkpoint
(random weights, float32, 100 MB shards) to DIR once, then loads it on ``--nproc`` CPU ranks (torchrun, gloo)
into a meta model sharded with ``fully_shard`` and prints, per rank: the local shard size, the peak resident
set (``ru_maxrss``) before and after the load, and the anonymous / file-backed resident memory after it.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys

import torch

CONFIG = dict(
    model_type="qwen3_moe",
    vocab_size=32000,
    hidden_size=1024,
    intermediate_size=2048,
    num_hidden_layers=4,
    num_attention_heads=16,
    num_key_value_heads=8,
    num_experts=16,
    num_experts_per_tok=4,
    moe_intermediate_size=768,
)


def _mib(kib: float) -> str:
    return f"{kib / 1024:.0f} MiB"


def _status(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(float(line.split()[1]) for line in f if line.startswith(field + ":"))


def _rank_main(checkpoint: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from veofast.models import build_foundation_model
    from veofast.models.hf_io import load_hf_weights

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = build_foundation_model(weights_path=checkpoint, init_device="meta", ops_backend="torch")
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")
    model.init_buffers()
    local_bytes = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    load_hf_weights(model, checkpoint)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        f"rank {rank}: local shard {local_bytes / 2**20:.0f} MiB; ru_maxrss before load {_mib(before)}, "
        f"after {_mib(after)} (+{_mib(after - before)}); after load RssAnon {_mib(_status('RssAnon'))}, "
        f"RssFile {_mib(_status('RssFile'))}",
        flush=True,
    )
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--dir", default="/tmp/veofast_load_memory_ckpt")
    args = parser.parse_args()
    if not os.path.isdir(args.dir):
        from veofast.models import build_foundation_model
        from veofast.models.hf_io import save_hf_weights

        model = build_foundation_model(config_overrides=CONFIG, init_device="cpu", ops_backend="torch")
        save_hf_weights(model, args.dir, max_shard_size="100MB")
        del model
    size = sum(os.path.getsize(os.path.join(args.dir, n)) for n in os.listdir(args.dir) if n.endswith(".safetensors"))
    print(f"checkpoint {args.dir}: {size / 2**20:.0f} MiB of safetensors, loading on {args.nproc} rank(s)", flush=True)
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}", __file__, args.dir]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VEOFAST_MEASURE_RANK": "1"}
    subprocess.run(command, check=True, env=env)


if __name__ == "__main__":
    torch.set_num_threads(1)
    if os.environ.get("VEOFAST_MEASURE_RANK"):
        _rank_main(sys.argv[1])
    else:
        main()
