"""Benchmark of the MoE ops at the Qwen3-30B-A3B layer shape: 16384 tokens, H=2048, I=768, top-8, bf16,
E=128 (and E=64), random routing (softmax top-k of random logits).

Three tables, providers side by side in one process:

- token movement (forward): ``moe_permute`` vs argsort + gather in torch, and ``moe_unpermute`` vs torch
  gather-mul-sum and torch ``index_add``. GB/s count the routed rows moved: permute reads and writes T*K*H
  elements (veofast reads each token once, so it can exceed the copy ceiling), unpermute reads T*K*H and
  writes T*H. Compared with the 4.21 TB/s device copy of ANCHORS.md.
- expert FFN forward + backward (TFLOP/s, 18*T*K*H*I flops): ``moe_ffn`` (Triton path; also with veofast's own
  Triton grouped GEMM instead of ``torch._grouped_mm``), ``expert_ffn`` alone on permuted rows, the plain-torch
  loop over experts (``moe_ffn_reference``), a torch implementation on ``torch._grouped_mm`` (argsort permute,
  autograd of ``_grouped_mm``, ``index_add`` combine), and dense matmuls of the same flops (the ceiling).
- checks: ``moe_ffn`` fwd+bwd under ``torch.cuda.set_sync_debug_mode("error")`` (no host sync), and the output
  error of veofast and of the bf16 loop against an fp32 loop.

    python bench/moe.py [--quick] [--repeats 20]
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import H200_BF16_TFLOPS, H200_COPY_TBPS, peak_extra_gib, print_table, record, time_ms  # noqa: E402
from veofast.ops import moe as moe_ops  # noqa: E402
from veofast.ops.moe import expert_ffn, moe_ffn, moe_ffn_reference, moe_permute, moe_unpermute  # noqa: E402

SUITE = "moe"
TOKENS, HIDDEN, INTER, TOPK = 16384, 2048, 768, 8
EXPERTS = (128, 64)
DTYPE = torch.bfloat16


# ------------------------------------------------------------------------------------------- torch providers


def torch_permute(hidden, ids, num_experts):
    """argsort + gather: rows grouped by expert, cumulative offsets and the inverse permutation (no host sync)."""
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    row_index = torch.empty_like(order)
    row_index[order] = torch.arange(order.numel(), device=order.device)
    counts = torch.histc(flat.float(), bins=num_experts, min=0, max=num_experts - 1)
    offsets = counts.cumsum(0).to(torch.int32)
    return hidden[order // ids.shape[1]], offsets, row_index, order


def torch_unpermute_gather(rows, row_index, weights):
    num_tokens, topk = weights.shape
    gathered = rows[row_index].view(num_tokens, topk, -1).float()
    return (gathered * weights.float().unsqueeze(-1)).sum(1).to(rows.dtype)


def torch_unpermute_index_add(rows, order, weights):
    """order: row -> flattened (t, k), the permutation of ``torch_permute``."""
    topk = weights.shape[1]
    scaled = rows.float() * weights.reshape(-1)[order].float().unsqueeze(-1)
    out = torch.zeros(weights.shape[0], rows.shape[1], dtype=torch.float32, device=rows.device)
    return out.index_add(0, order // topk, scaled).to(rows.dtype)


def torch_grouped_mm_ffn(hidden, ids, weights, gate_up, down):
    """The routed FFN in plain torch on ``torch._grouped_mm`` (its own autograd)."""
    rows, offsets, _, order = torch_permute(hidden, ids, gate_up.shape[0])
    gate, up = torch._grouped_mm(rows, gate_up.transpose(1, 2), offs=offsets).chunk(2, dim=-1)
    out_rows = torch._grouped_mm(F.silu(gate) * up, down.transpose(1, 2), offs=offsets)
    return torch_unpermute_index_add(out_rows, order, weights)


# ------------------------------------------------------------------------------------------------ inputs


def make_inputs(num_experts: int, *, seed: int = 0) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    logits = torch.randn(TOKENS, num_experts, device="cuda", generator=gen)
    weights, ids = torch.softmax(logits, dim=-1).topk(TOPK, dim=-1)
    hidden = torch.randn(TOKENS, HIDDEN, device="cuda", generator=gen, dtype=DTYPE)
    gate_up = torch.randn(num_experts, 2 * INTER, HIDDEN, device="cuda", generator=gen, dtype=DTYPE) / HIDDEN**0.5
    down = torch.randn(num_experts, HIDDEN, INTER, device="cuda", generator=gen, dtype=DTYPE) / INTER**0.5
    return {
        "hidden": hidden,
        "ids": ids,
        "weights": weights.to(DTYPE),
        "gate_up": gate_up,
        "down": down,
        "grad": torch.randn(TOKENS, HIDDEN, device="cuda", generator=gen, dtype=DTYPE),
    }


def _base_row(provider: str, num_experts: int, **extra) -> dict:
    return {"provider": provider, "T": TOKENS, "H": HIDDEN, "I": INTER, "E": num_experts, "K": TOPK, **extra}


def _guarded(row: dict, body) -> dict:
    """Runs body(row) filling the row; an OOM or error is recorded in it, not raised."""
    try:
        body(row)
    except torch.cuda.OutOfMemoryError:
        row["error"] = "OOM"
        print(f"note: {row['provider']} E={row['E']}: out of memory")
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        print(f"note: {row['provider']} E={row['E']} failed:\n{traceback.format_exc()}")
    torch.cuda.empty_cache()
    return record(SUITE, row)


# ---------------------------------------------------------------------------------------------- movement


def bench_movement(inp: dict, repeats: int) -> list[dict]:
    hidden, ids, weights = inp["hidden"], inp["ids"], inp["weights"]
    num_experts = inp["gate_up"].shape[0]
    elt = hidden.element_size()
    permute_bytes = 2 * TOKENS * TOPK * HIDDEN * elt
    unpermute_bytes = (TOKENS * TOPK + TOKENS) * HIDDEN * elt
    perm = moe_permute(hidden, ids, num_experts)
    _, _, _, order = torch_permute(hidden, ids, num_experts)
    cases = [
        ("permute", "veofast", lambda: moe_permute(hidden, ids, num_experts), permute_bytes),
        ("permute", "torch-argsort-gather", lambda: torch_permute(hidden, ids, num_experts), permute_bytes),
        ("unpermute", "veofast", lambda: moe_unpermute(perm.rows, perm.row_index, weights), unpermute_bytes),
        (
            "unpermute",
            "torch-gather-mul-sum",
            lambda: torch_unpermute_gather(perm.rows, perm.row_index, weights),
            unpermute_bytes,
        ),
        ("unpermute", "torch-index_add", lambda: torch_unpermute_index_add(perm.rows, order, weights), unpermute_bytes),
    ]
    rows = []
    for op, provider, fn, nbytes in cases:

        def body(row, fn=fn, nbytes=nbytes):
            with torch.no_grad():
                ms = time_ms(fn, warmup=5, repeats=repeats)
            gbps = nbytes / ms / 1e6
            row.update(ms=ms, gbps=gbps, pct_copy=100 * gbps / (H200_COPY_TBPS * 1e3))

        rows.append(_guarded(_base_row(provider, num_experts, op=op, mode="fwd", dtype="bfloat16"), body))
    return rows


# ------------------------------------------------------------------------------------------------ expert FFN


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_()


def bench_ffn(inp: dict, repeats: int) -> list[dict]:
    num_experts = inp["gate_up"].shape[0]
    ids, grad = inp["ids"], inp["grad"]
    hidden, weights, gate_up, down = (_leaf(inp[k]) for k in ("hidden", "weights", "gate_up", "down"))
    perm = moe_permute(inp["hidden"], ids, num_experts)
    rows_leaf = _leaf(perm.rows)
    grad_rows = torch.randn_like(perm.rows)
    routed = TOKENS * TOPK
    dense_x = _leaf(torch.randn(routed, HIDDEN, device="cuda", dtype=DTYPE))
    dense_w1 = _leaf(inp["gate_up"][0].T.contiguous())
    dense_w2 = _leaf(inp["down"][0].T.contiguous())
    grad_dense = torch.randn(routed, HIDDEN, device="cuda", dtype=DTYPE)

    def dense():
        gate, up = (dense_x @ dense_w1).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ dense_w2

    # provider -> (forward, output gradient, run on veofast's own Triton grouped GEMM instead of torch._grouped_mm)
    providers = {
        "veofast-moe_ffn": (lambda: moe_ffn(hidden, ids, weights, gate_up, down), grad, False),
        "veofast-moe_ffn[triton-gemm]": (lambda: moe_ffn(hidden, ids, weights, gate_up, down), grad, True),
        "veofast-expert_ffn": (lambda: expert_ffn(rows_leaf, perm.expert_offsets, gate_up, down), grad_rows, False),
        "torch-loop": (lambda: moe_ffn_reference(hidden, ids, weights, gate_up, down), grad, False),
        "torch-grouped_mm": (lambda: torch_grouped_mm_ffn(hidden, ids, weights, gate_up, down), grad, False),
        "dense-same-flops": (dense, grad_dense, False),
    }
    leaves = (hidden, weights, gate_up, down, rows_leaf, dense_x, dense_w1, dense_w2)
    flops = 18 * routed * HIDDEN * INTER
    rows = []
    for provider, (fwd, g, own_gemm) in providers.items():

        def step(fwd=fwd, g=g, own_gemm=own_gemm):
            for t in leaves:
                t.grad = None
            saved = moe_ops._torch_grouped_mm_ok
            if own_gemm:  # bench-only switch, forward and backward
                moe_ops._torch_grouped_mm_ok = lambda *mats, out_cols: False
            try:
                fwd().backward(g)
            finally:
                moe_ops._torch_grouped_mm_ok = saved

        def body(row, step=step):
            row["ms"] = time_ms(step, warmup=3, repeats=repeats)
            row["tflops"] = flops / row["ms"] / 1e9
            row["extra_peak_gib"] = peak_extra_gib(step)

        rows.append(_guarded(_base_row(provider, num_experts, op="ffn", mode="fwd+bwd", dtype="bfloat16"), body))
    by_name = {r["provider"]: r for r in rows}
    for r in rows:
        if "tflops" in r:
            dense_tflops = by_name["dense-same-flops"].get("tflops")
            loop_ms = by_name["torch-loop"].get("ms")
            r["pct_dense"] = 100 * r["tflops"] / dense_tflops if dense_tflops else None
            r["x_loop"] = loop_ms / r["ms"] if loop_ms else None
            r["pct_peak"] = 100 * r["tflops"] / H200_BF16_TFLOPS
    return rows


# ---------------------------------------------------------------------------------------------------- checks


def check_no_sync(inp: dict) -> dict:
    """moe_ffn fwd+bwd with torch.cuda.set_sync_debug_mode("error") (after a warm-up that compiles kernels)."""
    num_experts = inp["gate_up"].shape[0]
    hidden, weights, gate_up, down = (_leaf(inp[k]) for k in ("hidden", "weights", "gate_up", "down"))

    def body(row):
        moe_ffn(hidden, inp["ids"], weights, gate_up, down).backward(inp["grad"])
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            moe_ffn(hidden, inp["ids"], weights, gate_up, down).backward(inp["grad"])
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        row["no_host_sync"] = True

    row = _guarded(_base_row("veofast-moe_ffn", num_experts, check="sync_debug_mode_error"), body)
    print(f"sync check E={num_experts}: {'passed' if row.get('no_host_sync') else 'FAILED: ' + row.get('error', '')}")
    return row


def check_error(inp: dict) -> list[dict]:
    """Output error of veofast and of the bf16 torch loop against the loop in fp32."""
    num_experts = inp["gate_up"].shape[0]
    args = (inp["hidden"], inp["ids"], inp["weights"], inp["gate_up"], inp["down"])
    with torch.no_grad():
        ref = moe_ffn_reference(*(t.float() if t.is_floating_point() else t for t in args)).double()
        results = []
        for provider, fn in [("veofast-moe_ffn", moe_ffn), ("torch-loop", moe_ffn_reference)]:
            err = ((fn(*args).double() - ref).norm() / ref.norm()).item()
            print(f"correctness E={num_experts} {provider} vs fp32 loop: rel err {err:.2e}")
            results.append(record(SUITE, _base_row(provider, num_experts, check="rel_err_vs_fp32", rel_err=err)))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="E=128 only")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/moe.py needs a CUDA GPU")
    movement, ffn = [], []
    for num_experts in EXPERTS[:1] if args.quick else EXPERTS:
        inp = make_inputs(num_experts)
        check_error(inp)
        check_no_sync(inp)
        movement += bench_movement(inp, args.repeats)
        ffn += bench_ffn(inp, args.repeats)
        del inp
        torch.cuda.empty_cache()
    device = torch.cuda.get_device_name()
    print(f"\nMoE token movement, bf16, {device}; copy ceiling {H200_COPY_TBPS} TB/s")
    print_table(movement, ["op", "provider", "E", "ms", "gbps", "pct_copy", "error"])
    print(f"\nMoE expert FFN fwd+bwd, bf16, {device}; T={TOKENS} H={HIDDEN} I={INTER} K={TOPK}; flops 18*T*K*H*I")
    print_table(ffn, ["provider", "E", "ms", "tflops", "pct_dense", "x_loop", "pct_peak", "extra_peak_gib", "error"])


if __name__ == "__main__":
    main()
