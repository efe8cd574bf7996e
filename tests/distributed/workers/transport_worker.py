"""``resolve_transport`` on two ranks that report the same host or different ones (``socket.gethostname`` is
replaced per rank), for a CUDA run's SP group: the host check is a gloo collective, so it runs on the CPU.

Usage: torchrun --nproc_per_node=2 transport_worker.py OUT_DIR. Every rank writes ``{hosts: {transport: result or
"ValueError: ..."}}`` to ``OUT_DIR/rank{r}.json`` for hosts ``"same"`` and ``"split"`` (one host per rank).
"""

import json
import socket
import sys
from types import SimpleNamespace

import torch.distributed as dist
from worker_exit import run_and_exit

from veofast.distributed.sequence_parallel import resolve_transport


def resolve(transport: str, ps) -> str:
    try:
        return resolve_transport(transport, ps)
    except ValueError as exc:
        return f"ValueError: {exc}"


def main():
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    ps = SimpleNamespace(device_type="cuda", sp_size=2, sp_group=dist.group.WORLD)
    report = {}
    for hosts, name in (("same", "node"), ("split", f"node{rank}")):
        socket.gethostname = lambda name=name: name
        report[hosts] = {transport: resolve(transport, ps) for transport in ("auto", "copy_engine", "nccl")}
    with open(f"{sys.argv[1]}/rank{rank}.json", "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    run_and_exit(main)
