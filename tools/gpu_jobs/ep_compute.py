"""What one rank of EP=2 computes in a Qwen3-30B-A3B MoE layer, on one GPU, without the all-to-alls.

With the all-to-all dispatch (``veofast.distributed.expert_parallel``) rank 0 runs its 64 local experts on its own
16384 tokens and on the tokens of rank 1 that need one of those experts (in one call, or split around the
exchange); with the all-gather dispatch on all 32768 tokens, rows sized for the worst case. Here both ranks'
tokens are drawn as ``bench/moe_ep.py`` draws them and rank 0's work is timed (fwd+bwd) next to EP=1:
``moe_ffn`` with all 128 experts on rank 0's tokens. The ratio is a floor for the EP=2 / EP=1 layer-time ratio
(communication and the per-layer host sync come on top), and the bytes that the all-to-alls would move are printed.

    python3 tools/gpu_jobs/ep_compute.py
"""

from __future__ import annotations

import argparse
import sys

import torch

sys.path.insert(0, ".")
from bench.common import time_ms  # noqa: E402
from bench.moe_ep import expert_weights, tokens  # noqa: E402
from veofast.ops import moe_ffn  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--inter", type=int, default=768)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--topk", type=int, default=8)
    args = parser.parse_args()
    device, dtype = torch.device("cuda"), torch.bfloat16
    local = args.experts // 2
    gate_up, down = expert_weights(args, device, dtype)
    gate_up.requires_grad_(True)
    down.requires_grad_(True)
    own, peer = tokens(args, device, dtype, seed=1), tokens(args, device, dtype, seed=2)
    # rank 1's tokens with at least one expert in [0, local), their ids made local (-1 for rank 1's own experts)
    travels = (peer["ids"] < local).any(1)
    recv_ids = torch.where(peer["ids"] < local, peer["ids"], -1)[travels]
    recv = {
        "hidden": peer["hidden"].detach()[travels].requires_grad_(True),
        "weights": peer["weights"].detach()[travels].requires_grad_(True),
        "ids": recv_ids,
    }
    grad_recv = torch.randn_like(recv["hidden"])
    local_gate_up = gate_up.detach()[:local].clone().requires_grad_(True)
    local_down = down.detach()[:local].clone().requires_grad_(True)
    recv["grad_out"] = grad_recv
    half = args.tokens // 2
    own_halves = [{k: v[s] for k, v in own.items()} for s in (slice(0, half), slice(half, None))]
    together = {k: torch.cat([own[k], recv[k]]).detach() for k in ("hidden", "ids", "weights", "grad_out")}
    for k in ("hidden", "weights"):
        together[k].requires_grad_(True)
    gathered = {k: torch.cat([own[k], peer[k]]).detach() for k in ("hidden", "ids", "weights", "grad_out")}
    for k in ("hidden", "weights"):
        gathered[k].requires_grad_(True)
    variants = {  # the calls of moe_ffn on rank 0's local experts
        "own in two halves, then received (3 calls)": [*own_halves, recv],
        "own, then received (2 calls)": [own, recv],
        "own and received together (1 call)": [together],
        "all-gather: all tokens of both, worst-case rows (1 call)": [gathered],
    }

    def ep1() -> None:
        out = moe_ffn(own["hidden"], own["ids"], own["weights"], gate_up, down, check_ids=False)
        out.backward(own["grad_out"])

    for calls in variants.values():  # the kept slots of each call, known on the host as the dispatcher knows them
        for c in calls:
            c["rows"] = int(((c["ids"] >= 0) & (c["ids"] < local)).sum()) if c is not gathered else None

    def rank0(calls: list[dict]) -> None:
        outs = [
            moe_ffn(c["hidden"], c["ids"], c["weights"], local_gate_up, local_down, first_expert=0, num_rows=c["rows"])
            for c in calls
        ]
        torch.autograd.backward(outs, [c["grad_out"] for c in calls])

    ms1 = time_ms(ep1, repeats=20)
    sent, slot_rows = int(travels.sum()), int((peer["ids"] < local).sum())
    mib = args.hidden * 2 / 2**20
    print(f"EP=1, {args.tokens} tokens, {args.experts} experts: {ms1:.2f} ms fwd+bwd")
    for name, calls in variants.items():
        ms2 = time_ms(lambda calls=calls: rank0(calls), repeats=20)
        print(
            f"EP=2 rank 0 compute, {name} ({local} experts; own {args.tokens} tokens + {sent} received): "
            f"{ms2:.2f} ms = {ms2 / ms1:.3f}x EP=1 (no communication)"
        )
    print(
        f"rows sent to the peer per all-to-all: {sent} tokens = {sent * mib:.0f} MiB (a (token, slot) dispatch "
        f"sends {slot_rows} rows = {slot_rows * mib:.0f} MiB)"
    )


if __name__ == "__main__":
    main()
