"""Build a parallel state from command-line sizes (dp sp ep out_dir [late_seconds]); each rank writes its view as
JSON. With ``late_seconds`` the process group is initialised first and the last rank starts building the parallel
state that much later; each view records how long its ``init_parallel_state`` took."""

import json
import sys
import time

import torch.distributed as dist
from worker_exit import run_and_exit

from veofast.distributed.parallel_state import init_parallel_state


def main():
    dp, sp, ep = (int(x) for x in sys.argv[1:4])
    if len(sys.argv) > 5:
        dist.init_process_group("gloo")
        if dist.get_rank() == dist.get_world_size() - 1:
            time.sleep(float(sys.argv[5]))
    start = time.perf_counter()
    ps = init_parallel_state(dp_size=dp, ulysses_size=sp, ep_size=ep, dp_mode="fsdp2", device_type="cpu")
    init_seconds = time.perf_counter() - start
    view = {
        "rank": ps.global_rank, "dp_rank": ps.dp_rank, "dp_size": ps.dp_size, "sp_rank": ps.sp_rank,
        "sp_size": ps.sp_size, "ep_rank": ps.ep_rank, "ep_size": ps.ep_size, "fsdp_size": ps.fsdp_mesh.size(),
        "dp_group": dist.get_process_group_ranks(ps.dp_group), "sp_group": dist.get_process_group_ranks(ps.sp_group),
        "ep_group": dist.get_process_group_ranks(ps.ep_group),
        "fsdp_group": dist.get_process_group_ranks(ps.fsdp_group), "tp_size": ps.tp_mesh.size(),
        "init_seconds": init_seconds,
    }
    with open(f"{sys.argv[4]}/view_rank{ps.global_rank}.json", "w") as f:
        json.dump(view, f)


if __name__ == "__main__":
    run_and_exit(main)
