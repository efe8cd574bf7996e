"""One attention layer under Ulysses SP matches the same layer on the whole sequence, forward and backward.

Usage: torchrun --nproc_per_node=P sp_attention_worker.py. Every rank builds the same float64 ``Attention`` and
packed input (documents straddle the rank boundaries), runs it whole as the reference, then runs a
``UlyssesAttention`` over the same weights on its slice of tokens. Checked: the output slice, the gradient of
the input slice, and the parameter gradients summed over ranks (each rank holds its share of them). Cases:
KV heads split over the ranks, KV heads replicated (fewer KV heads than ranks) with qk-norm and biases, the
synchronous (no-overlap) communication mode, and the head-chunked pipeline (``head_chunks`` 1, 2 and the most the
local KV heads allow, GQA and plain multi-head, every comm mode). For two chunks the order in which the
all-to-alls start and finish is checked too (it is what makes the pipeline overlap, forward and backward). Exits
non-zero on a mismatch.
"""

import copy

import torch
import torch.distributed as dist

from veofast.distributed import ulysses_comm
from veofast.distributed.sequence_parallel import UlyssesAttention
from veofast.models.config import DecoderConfig
from veofast.models.layers import Attention
from veofast.models.rotary import rotary_frequencies
from veofast.utils.helper import exit_process

CASES = [
    {"num_attention_heads": 4, "num_key_value_heads": 2, "comm_mode": "async"},
    {"num_attention_heads": 4, "num_key_value_heads": 1, "comm_mode": "async", "qk_norm": True,
     "attention_bias": True},
    {"num_attention_heads": 4, "num_key_value_heads": 2, "comm_mode": "sync"},
    # head chunks (2 ranks): 16 query / 8 KV heads -> 4 local KV heads in groups of 2 query heads; 1, 2, 4 chunks
    {"num_attention_heads": 16, "num_key_value_heads": 8, "comm_mode": "async", "head_chunks": 1},
    {"num_attention_heads": 16, "num_key_value_heads": 8, "comm_mode": "async", "head_chunks": 2, "order": True},
    {"num_attention_heads": 16, "num_key_value_heads": 8, "comm_mode": "async", "head_chunks": 4, "qk_norm": True,
     "attention_bias": True},
    {"num_attention_heads": 16, "num_key_value_heads": 8, "comm_mode": "sync", "head_chunks": 4},
    {"num_attention_heads": 16, "num_key_value_heads": 8, "comm_mode": "skip", "head_chunks": 4},
    {"num_attention_heads": 8, "num_key_value_heads": 8, "comm_mode": "async", "head_chunks": 2},  # multi-head
    # KV heads replicated (1 KV head, 2 ranks): one local KV head, so one chunk
    {"num_attention_heads": 8, "num_key_value_heads": 1, "comm_mode": "async", "head_chunks": 1},
]
DOC_LENGTHS = [5, 9, 1, 7]  # 22 tokens: 11 per rank with 2 ranks, documents cross the boundary


class Recorder:
    """Records ``(op, label)`` of every ``InFlight.start`` / ``finish`` while active."""

    def __init__(self):
        self.events: list[tuple[str, str]] = []
        self._start, self._finish = ulysses_comm.InFlight.start, ulysses_comm.InFlight.finish

    def __enter__(self):
        recorder, start, finish = self, self._start, self._finish

        def recorded_start(flight, send):
            recorder.events.append(("start", flight.label))
            return start(flight, send)

        def recorded_finish(flight):
            recorder.events.append(("finish", flight.label))
            return finish(flight)

        ulysses_comm.InFlight.start, ulysses_comm.InFlight.finish = recorded_start, recorded_finish
        return self

    def __exit__(self, *exc):
        ulysses_comm.InFlight.start, ulysses_comm.InFlight.finish = self._start, self._finish

    def index(self, op: str, label: str) -> int:
        return self.events.index((op, label))


def check_order(forward: Recorder, backward: Recorder, chunks: int) -> None:
    """The pipeline's order: forward, chunk c's output leaves before chunk c+1's inputs are waited for, and every
    input is launched before chunk 0's wait; backward, chunk c's input gradients leave before chunk c-1's output
    gradient is waited for (which is what chunk c-1's attention backward waits on)."""
    fwd, bwd = forward.index, backward.index
    problems = []
    inputs = [f"{name}{c}" for c in range(chunks) for name in "qkv"]
    if [label for op, label in forward.events if op == "start"][:len(inputs)] != inputs:
        problems.append("forward: the inputs are not launched first, chunk by chunk")
    for c in range(chunks - 1):
        if not fwd("start", f"o{c}") < fwd("finish", f"q{c + 1}"):
            problems.append(f"forward: o{c} launched after chunk {c + 1}'s wait")
    if [label for op, label in backward.events if op == "start"][:chunks] != [f"o{c}" for c in reversed(range(chunks))]:
        problems.append("backward: the output gradients do not leave first, last chunk first")
    for c in range(1, chunks):
        for name in "qkv":
            if not bwd("start", f"{name}{c}") < bwd("finish", f"o{c - 1}"):
                problems.append(f"backward: {name}{c} launched after chunk {c - 1}'s attention backward")
            if not bwd("finish", f"{name}{c}") > bwd("finish", "o0"):
                problems.append(f"backward: {name}{c} waited for before chunk 0's attention backward")
    if problems:
        raise AssertionError(f"{problems}\nforward {forward.events}\nbackward {backward.events}")


def check_case(case: dict, rank: int, size: int) -> None:
    case = dict(case)
    mode = case.pop("comm_mode")
    chunks = case.pop("head_chunks", 1)
    order = case.pop("order", False)
    config = DecoderConfig(model_type="qwen3", hidden_size=16, head_dim=8, ops_backend="torch", **case)
    torch.manual_seed(0)
    attn = Attention(config).double()
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    inv_freq, scaling = rotary_frequencies(config)
    total = sum(DOC_LENGTHS)
    assert total % size == 0
    cu_seqlens = torch.tensor([0, *DOC_LENGTHS]).cumsum(0).to(torch.int32)
    positions = torch.cat([torch.arange(n) for n in DOC_LENGTHS])
    hidden = torch.randn(total, config.hidden_size, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(total, config.hidden_size, dtype=torch.float64)

    ulysses = UlyssesAttention(copy.deepcopy(attn), dist.group.WORLD, size, comm_mode=mode, head_chunks=chunks)
    ref = attn(hidden, positions, cu_seqlens, max(DOC_LENGTHS), inv_freq, scaling)
    (ref * weight).sum().backward()

    n = total // size
    window = slice(rank * n, (rank + 1) * n)
    local = hidden.detach()[window].clone().requires_grad_(True)
    with Recorder() as forward:
        out = ulysses(local, positions[window], cu_seqlens, max(DOC_LENGTHS), inv_freq, scaling)
    with Recorder() as backward:
        (out * weight[window]).sum().backward()
    if order:
        check_order(forward, backward, ulysses.head_chunks)
    if mode == "skip":  # no communication: wrong values by design; the shapes and the gradients' presence count
        if out.shape != (n, config.hidden_size) or local.grad is None:
            raise AssertionError(f"{case} skip: output {tuple(out.shape)}, input grad {local.grad is not None}")
        return

    def close(name, a, b):
        if not torch.allclose(a, b, rtol=1e-9, atol=1e-11):
            raise AssertionError(f"{case} {mode} chunks={chunks}: {name} differs by {(a - b).abs().max().item():.3g}")

    close("output", out.detach(), ref.detach()[window])
    close("input grad", local.grad, hidden.grad[window])
    for (name, p_ref), p_sp in zip(attn.named_parameters(), ulysses.parameters(), strict=True):
        grad = p_sp.grad.clone()
        dist.all_reduce(grad)
        close(f"{name} grad", grad, p_ref.grad)


def main() -> None:
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    for case in CASES:
        check_case(case, rank, size)


if __name__ == "__main__":
    code = 0
    try:
        main()
    except Exception:
        import traceback

        traceback.print_exc()
        code = 1
    exit_process(code)
