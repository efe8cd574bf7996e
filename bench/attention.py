"""Benchmark of packed varlen causal attention (the ANCHORS.md shape: 32768 tokens, 19 documents of 64..4096,
32 query / 8 KV heads, head_dim 128, bf16), providers side by side in one process:

- ``veofast``: ``varlen_attention`` (Triton kernels);
- ``torch_varlen``: ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention-2 inside), causal via
  ``window_size=(-1, 0)`` or ``is_causal=True``, whichever this torch has;
- ``flex``: FlexAttention compiled, with a document-causal block mask built once per shape (inputs laid out
  ``(1, H, T, D)`` outside the timing);
- ``sdpa_loop``: SDPA (flash) called once per document;
- ``reference``: ``varlen_attention_reference``, at the small shape only.

FLOPs count the causal pairs only: fwd = 4 * head_dim * num_q_heads * sum(L (L + 1) / 2), fwd+bwd = 3.5 * fwd.
Shapes: the anchor mix, uniform documents of 512/2048/8192/32768 tokens, head_dim 64 and 256 at the anchor mix,
a 1-token document among long ones, and a small mix. Also checks that a veofast fwd+bwd never syncs with the
host, and the output difference against ``sdpa_loop``. A failing provider is reported, not fatal.

    python bench/attention.py [--quick] [--repeats 20]
"""

from __future__ import annotations

import argparse
import inspect
import random
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import peak_extra_gib, print_table, record, time_ms  # noqa: E402
from veofast.ops.attention import varlen_attention, varlen_attention_reference  # noqa: E402

SUITE = "attention"
DTYPE = torch.bfloat16
TOTAL = 32768
# ANCHORS.md, fwd / fwd+bwd TFLOP/s on one H200.
PEERS = {"sdpa_loop": (150, 123), "torch_varlen": (274, 240), "flex": (279, 255)}


def anchor_lengths(total: int = TOTAL, docs: int = 19, lo: int = 64, hi: int = 4096, seed: int = 0) -> list[int]:
    """``docs`` seeded random lengths in [lo, hi] that sum to ``total``."""
    rng = random.Random(seed)
    lengths = [rng.randint(lo, hi) for _ in range(docs)]
    lengths = [min(hi, max(lo, round(n * total / sum(lengths)))) for n in lengths]
    i = 0
    while sum(lengths) != total:
        step = 1 if sum(lengths) < total else -1
        if lo <= lengths[i % docs] + step <= hi:
            lengths[i % docs] += step
        i += 1
    return lengths


def shapes(quick: bool) -> list[tuple[str, list[int], int, int, int]]:
    """(name, document lengths, num_q_heads, num_kv_heads, head_dim)."""
    anchor = anchor_lengths()
    small = ("small-mix", [64, 300, 1000, 700, 2032], 32, 8, 128)
    if quick:
        return [("anchor", anchor, 32, 8, 128), small]
    return [
        ("anchor", anchor, 32, 8, 128),
        *[(f"uniform-{n}", [n] * (TOTAL // n), 32, 8, 128) for n in (512, 2048, 8192, 32768)],
        ("anchor-d64", anchor, 32, 8, 64),
        ("anchor-d256", anchor, 32, 8, 256),
        ("one-token-doc", [8192, 8192, 1, 8191, 8192], 32, 8, 128),
        small,
    ]


# ------------------------------------------------------------------------------------------------- providers
def make_veofast(q, k, v, lengths, cu):
    max_len = max(lengths)
    return lambda q, k, v: varlen_attention(q, k, v, cu, cu, max_len, max_len, causal=True, backend="triton")


def make_reference(q, k, v, lengths, cu):
    max_len = max(lengths)
    return lambda q, k, v: varlen_attention_reference(q, k, v, cu, cu, max_len, max_len, causal=True)


def make_torch_varlen(q, k, v, lengths, cu):
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    gqa = {"enable_gqa": True} if "enable_gqa" in params else {}
    max_len = max(lengths)
    group = q.shape[1] // k.shape[1]
    call = lambda q, k, v: varlen_attn(q, k, v, cu, cu, max_len, max_len, **causal, **gqa)
    if gqa or group == 1:
        return call
    # No GQA switch in this torch: K/V heads are repeated inside the timed call (what a user would have to do).
    return lambda q, k, v: call(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1))


def make_flex(q, k, v, lengths, cu):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    doc = torch.repeat_interleave(torch.arange(len(lengths), device=q.device), torch.tensor(lengths, device=q.device))

    def document_causal(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

    total = q.shape[0]
    block_mask = create_block_mask(document_causal, None, None, total, total, device=q.device)
    flex = torch.compile(flex_attention)
    return lambda q, k, v: flex(q, k, v, block_mask=block_mask, enable_gqa=True)


def make_sdpa_loop(q, k, v, lengths, cu):
    bounds = [0, *torch.tensor(lengths).cumsum(0).tolist()]

    def run(q, k, v):
        outs = [
            F.scaled_dot_product_attention(
                q[a:b].transpose(0, 1),
                k[a:b].transpose(0, 1),
                v[a:b].transpose(0, 1),
                is_causal=True,
                enable_gqa=True,
            ).transpose(0, 1)
            for a, b in zip(bounds[:-1], bounds[1:], strict=True)
        ]
        return torch.cat(outs)

    return run


PROVIDERS = {
    "veofast": make_veofast,
    "torch_varlen": make_torch_varlen,
    "flex": make_flex,
    "sdpa_loop": make_sdpa_loop,
    "reference": make_reference,
}
HEAD_MAJOR = {"flex"}  # providers that take (1, H, T, D) instead of (T, H, D)


def to_provider_layout(name: str, t: torch.Tensor) -> torch.Tensor:
    return t.transpose(0, 1).unsqueeze(0).contiguous() if name in HEAD_MAJOR else t


def from_provider_layout(name: str, t: torch.Tensor) -> torch.Tensor:
    return t.squeeze(0).transpose(0, 1) if name in HEAD_MAJOR else t


# ---------------------------------------------------------------------------------------------------- runner
def measure(fn, q, k, v, dout, fwd_flops, repeats, row) -> torch.Tensor:
    """Time ``fn`` fwd (no grad) and fwd+bwd into ``row``; return its output."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    fwd_bwd = lambda: torch.autograd.grad(fn(*leaves), leaves, dout)
    with torch.no_grad():
        out = fn(q, k, v)
        row["fwd_ms"] = time_ms(lambda: fn(q, k, v), repeats=repeats)
    row["fwdbwd_ms"] = time_ms(fwd_bwd, repeats=repeats)
    row["peak_gib"] = peak_extra_gib(fwd_bwd)
    row["fwd_tflops"] = fwd_flops / row["fwd_ms"] / 1e9
    row["fwdbwd_tflops"] = 3.5 * fwd_flops / row["fwdbwd_ms"] / 1e9
    return out


def bench_shape(name, lengths, hq, hk, d, repeats, rows):
    total = sum(lengths)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (torch.randn(total, h, d, device="cuda", dtype=DTYPE, generator=gen) for h in (hq, hk, hk, hq))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    fwd_flops = 4 * d * hq * sum(n * (n + 1) // 2 for n in lengths)
    outputs = {}
    for provider, make in PROVIDERS.items():
        if provider == "reference" and not name.startswith("small"):
            continue
        row = {
            "shape": name,
            "provider": provider,
            "tokens": total,
            "docs": len(lengths),
            "q_heads": hq,
            "kv_heads": hk,
            "head_dim": d,
            "dtype": str(DTYPE).removeprefix("torch."),
        }
        try:
            pq, pk, pv, pdout = (to_provider_layout(provider, t) for t in (q, k, v, dout))
            out = measure(make(q, k, v, lengths, cu), pq, pk, pv, pdout, fwd_flops, repeats, row)
            if provider in ("veofast", "sdpa_loop"):
                outputs[provider] = from_provider_layout(provider, out).float()
        except Exception as exc:  # report and go on: one provider must not stop the suite
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            traceback.print_exc(limit=2)
        rows.append(record(SUITE, row))
    if len(outputs) == 2:
        diff = (outputs["veofast"] - outputs["sdpa_loop"]).abs().max().item()
        print(f"[{name}] max |veofast - sdpa_loop| = {diff:.3g} (bf16 outputs)")
        record(SUITE, {"shape": name, "check": "max_abs_diff_vs_sdpa_loop", "value": diff})


def check_no_host_sync(lengths, hq, hk, d):
    """Run a warmed-up veofast fwd+bwd with CUDA sync debugging set to error."""
    total = sum(lengths)
    q = torch.randn(total, hq, d, device="cuda", dtype=DTYPE, requires_grad=True)
    k = torch.randn(total, hk, d, device="cuda", dtype=DTYPE, requires_grad=True)
    v = torch.randn(total, hk, d, device="cuda", dtype=DTYPE, requires_grad=True)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    run = lambda: varlen_attention(q, k, v, cu, cu, max(lengths), max(lengths), backend="triton").sum().backward()
    run()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()
        ok, note = True, ""
    except RuntimeError as exc:
        ok, note = False, str(exc).splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    print(f"veofast fwd+bwd free of host syncs: {ok} {note}")
    record(SUITE, {"check": "no_host_sync", "value": ok, "note": note})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the anchor and the small mix only")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/attention.py needs a CUDA GPU")
    rows: list[dict] = []
    for name, lengths, hq, hk, d in shapes(args.quick):
        print(f"--- {name}: {len(lengths)} docs, {sum(lengths)} tokens, heads {hq}/{hk}, head_dim {d}", flush=True)
        bench_shape(name, lengths, hq, hk, d, args.repeats, rows)
        torch.cuda.empty_cache()
    check_no_host_sync(anchor_lengths(), 32, 8, 128)
    print()
    print("ANCHORS.md peers at the anchor (fwd / fwd+bwd TFLOP/s):", PEERS)
    print_table(
        rows,
        ["shape", "provider", "head_dim", "fwd_ms", "fwd_tflops", "fwdbwd_ms", "fwdbwd_tflops", "peak_gib", "error"],
    )


if __name__ == "__main__":
    main()
