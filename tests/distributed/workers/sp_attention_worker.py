"""One attention layer under Ulysses SP matches the same layer on the whole sequence, forward and backward.

Usage: torchrun --nproc_per_node=P sp_attention_worker.py. Every rank builds the same float64 ``Attention`` and
packed input (documents straddle the rank boundaries), runs it whole as the reference, then runs a
``UlyssesAttention`` over the same weights on its slice of tokens. Checked: the output slice, the gradient of
the input slice, and the parameter gradients summed over ranks (each rank holds its share of them). Cases:
KV heads split over the ranks, KV heads replicated (fewer KV heads than ranks) with qk-norm and biases, and the
synchronous (no-overlap) communication mode. Exits non-zero on a mismatch.
"""

import copy

import torch
import torch.distributed as dist

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
]
DOC_LENGTHS = [5, 9, 1, 7]  # 22 tokens: 11 per rank with 2 ranks, documents cross the boundary


def check_case(case: dict, rank: int, size: int) -> None:
    case = dict(case)
    mode = case.pop("comm_mode")
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

    ulysses = UlyssesAttention(copy.deepcopy(attn), dist.group.WORLD, size, comm_mode=mode)
    ref = attn(hidden, positions, cu_seqlens, max(DOC_LENGTHS), inv_freq, scaling)
    (ref * weight).sum().backward()

    n = total // size
    window = slice(rank * n, (rank + 1) * n)
    local = hidden.detach()[window].clone().requires_grad_(True)
    out = ulysses(local, positions[window], cu_seqlens, max(DOC_LENGTHS), inv_freq, scaling)
    (out * weight[window]).sum().backward()

    def close(name, a, b):
        if not torch.allclose(a, b, rtol=1e-9, atol=1e-11):
            raise AssertionError(f"{case} {mode}: {name} differs by {(a - b).abs().max().item():.3g}")

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
