"""Worker for the 2-rank Hugging Face interop tests (run under torchrun, gloo, CPU).

``fsdp_hf_worker.py CHECKPOINT OUT [CHECKPOINT OUT ...]``: for each pair, builds a meta veofast model from
CHECKPOINT, shards it with FSDP2 (each DecoderLayer, then the root) on a 1-D mesh of all ranks, materialises
it, loads CHECKPOINT with ``load_hf_weights`` and writes, from rank 0:

- ``OUT/fsdp.safetensors``: every parameter gathered with ``full_tensor()``;
- ``OUT/saved/``: ``save_hf_weights`` of the sharded model (all ranks take part);
- ``OUT/dtensor.safetensors``: the same checkpoint loaded into a model whose parameters were replaced by
  DTensors of other layouts (Shard(1) on the 1-D mesh; experts Shard(0) x Shard(1) on a (world, 1) mesh, as
  expert parallelism slices them; Replicate), gathered;
- ``OUT/rank{r}.json``: this rank's peak host memory (``ru_maxrss``) before and after the FSDP load;
- ``OUT/rank{r}_expert_keys.json``: the per-expert checkpoint keys this rank read in the expert-parallel layout.
"""

from __future__ import annotations

import json
import os
import resource
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

from veofast.models import build_foundation_model, hf_io, materialize_model
from veofast.models.hf_io import load_hf_weights, save_hf_weights


def _max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _gathered(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every state-dict tensor in full (all ranks take part); tied names appear once."""
    out, seen = {}, set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        out[name] = tensor.detach().full_tensor().contiguous()
    return out


def _redistribute(model: nn.Module, mesh, expert_mesh) -> None:
    """Replace every parameter by a zero DTensor of another layout (so loading must fill it); ties are kept."""
    replaced: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if id(param) not in replaced:
                zeros = torch.zeros_like(param)
                if param.dim() == 3:
                    dtensor = distribute_tensor(zeros, expert_mesh, [Shard(0), Shard(1)])
                elif param.dim() == 2:
                    dtensor = distribute_tensor(zeros, mesh, [Shard(1)])
                else:
                    dtensor = distribute_tensor(zeros, mesh, [Replicate()])
                replaced[id(param)] = nn.Parameter(dtensor)
            setattr(module, name, replaced[id(param)])


def run(checkpoint: str, out: str, mesh, expert_mesh) -> None:
    rank = dist.get_rank()

    model = build_foundation_model(weights_path=checkpoint, init_device="meta", ops_backend="torch")
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")
    model.init_buffers()
    rss_before = _max_rss_mib()
    load_hf_weights(model, checkpoint)
    rss_after = _max_rss_mib()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"max_rss_mib_before_load": rss_before, "max_rss_mib_after_load": rss_after}, f)

    gathered = _gathered(model)
    if rank == 0:
        save_file(gathered, os.path.join(out, "fsdp.safetensors"))
    save_hf_weights(model, os.path.join(out, "saved"), max_shard_size="20KB")

    plain = build_foundation_model(weights_path=checkpoint, init_device="meta", ops_backend="torch")
    plain.to_empty(device="cpu")
    _redistribute(plain, mesh, expert_mesh)
    read_keys = []
    read_block = hf_io._read_block

    def recording_read_block(handle, block, lo, hi):
        read_keys.append(block.key)
        return read_block(handle, block, lo, hi)

    hf_io._read_block = recording_read_block
    materialize_model(plain)  # re-ties the embeddings (to_empty from meta unties them), then load_hf_weights
    hf_io._read_block = read_block
    with open(os.path.join(out, f"rank{rank}_expert_keys.json"), "w") as f:
        json.dump(sorted(key for key in read_keys if ".experts." in key), f)
    gathered = _gathered(plain)
    if rank == 0:
        save_file(gathered, os.path.join(out, "dtensor.safetensors"))


def main(args: list[str]) -> None:
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    expert_mesh = init_device_mesh("cpu", (world, 1), mesh_dim_names=("ep", "fsdp"))
    for checkpoint, out in zip(args[::2], args[1::2], strict=True):
        run(checkpoint, out, mesh, expert_mesh)


if __name__ == "__main__":
    code = 0
    try:
        main(sys.argv[1:])
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
