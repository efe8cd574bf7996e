"""``total_grad_norm`` / ``clip_grad_norm`` on two ranks whose gradients differ in presence and finiteness.

Usage: torchrun --nproc_per_node=2 grad_norm_worker.py OUT_DIR. The module holds ``sharded (4,)``, a DTensor
``Shard(0)`` over both ranks (2 values each), and ``plain (2,)``, replicated. Each case gives rank ``r`` the local
gradients below; every rank writes ``{case: [norm, sum of its clipped gradients]}`` to ``OUT_DIR/rank{r}.json``.

- ``missing``: rank 1 has no gradient for ``sharded`` (as for a parameter that no token reached there); rank 0
  has ``[3, 0]``, ``plain`` is ``[0, 4]`` on both: the norm is 5 on both ranks.
- ``inf_on_one``: rank 1's shard of ``sharded`` holds an inf: the norm is inf on both ranks, which then agree to
  skip the step, and no gradient is scaled.
"""

import json
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard
from worker_exit import run_and_exit

from veofast.distributed.grad_norm import clip_grad_norm

CASES = {  # case -> per rank: (local grad of sharded or None, grad of plain)
    "missing": [([3.0, 0.0], [0.0, 4.0]), (None, [0.0, 4.0])],
    "inf_on_one": [([3.0, 0.0], [0.0, 4.0]), ([float("inf"), 1.0], [0.0, 4.0])],
}


def module_with_grads(mesh, sharded_grad: list[float] | None, plain_grad: list[float]) -> nn.Module:
    module = nn.Module()
    local = torch.zeros(2)
    module.sharded = nn.Parameter(DTensor.from_local(local, mesh, [Shard(0)], run_check=False))
    module.plain = nn.Parameter(torch.zeros(2))
    if sharded_grad is not None:
        module.sharded.grad = DTensor.from_local(torch.tensor(sharded_grad), mesh, [Shard(0)], run_check=False)
    module.plain.grad = torch.tensor(plain_grad)
    return module


def main():
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (2,))
    report = {}
    for case, per_rank in CASES.items():
        module = module_with_grads(mesh, *per_rank[rank])
        norm = clip_grad_norm(module, 1.0)
        grads = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in module.parameters()
                 if p.grad is not None]
        report[case] = [norm.item(), torch.cat(grads).sum().item()]
    with open(f"{sys.argv[1]}/rank{rank}.json", "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    run_and_exit(main)
