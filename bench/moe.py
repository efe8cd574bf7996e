"""Benchmark of the MoE ops: token movement (permute / unpermute, forward and backward), the expert FFN, and where
the time of one MoE block goes. bf16, random routing (softmax top-k of random logits).

Shapes: the issue's anchor (16384 tokens, H=2048, I=768, top-8, E=128 and 64) and the training step's
(8192 tokens, E=128, top-8, H=2048). Sections (``--sections``, default ``checks movement ffn``):

- ``movement``: veofast vs torch (argsort + gather, gather-mul-sum, ``index_add``, torch autograd for the
  backwards) side by side. GB/s count only the bytes an op must move (index tensors aside): permute reads T*H and
  writes T*K*H; unpermute reads T*K*H and the weights and writes T*H; the permute backward reads T*K*H and writes
  T*H; the unpermute backward reads T*H (the output gradient), T*K*H (the rows, for the weights' gradient) and the
  weights, and writes T*K*H and the weights' gradient. Compared with the 4.21 TB/s copy ceiling of ANCHORS.md.
  Each time is the median of back-to-back batches of calls (the way a training step queues them), divided.
- ``sweep``: the same ops over the configs in ``SWEEP`` (the tunables of ``veofast.kernels.moe_permute``), each
  first checked in bf16 against a float64 reference, at all three shapes; prints the best config per op.
- ``ffn``: expert FFN forward + backward (TFLOP/s, 18*T*K*H*I flops): ``moe_ffn`` (also with veofast's own
  Triton grouped GEMM), ``expert_ffn`` alone, the plain-torch loop over experts, torch on ``torch._grouped_mm``,
  and dense matmuls of the same flops (the ceiling).
- ``checks``: ``moe_ffn`` fwd+bwd under ``torch.cuda.set_sync_debug_mode("error")``, and the output error of
  veofast and of the bf16 loop against an fp32 loop.
- ``profile``: ``torch.profiler`` of one ``SparseMoeBlock`` (router + experts, as the model runs it) forward +
  backward at the training shape: kernel time by class and the top kernels.

Lines starting with ``SUMMARY`` are the compact result (``tools/gpu_jobs/moe.sh`` prints them).

    python bench/moe.py [--quick] [--repeats 20] [--sections sweep profile] [--budget-s 150]
    TRITON_INTERPRET=1 python bench/moe.py --smoke --sections sweep profile   # tiny shapes on a CPU
"""

from __future__ import annotations

import argparse
import collections
import functools
import itertools
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import H200_BF16_TFLOPS, H200_COPY_TBPS, peak_extra_gib, print_table, record, time_ms  # noqa: E402
from veofast.ops import moe as moe_ops  # noqa: E402
from veofast.ops.moe import (  # noqa: E402
    expert_ffn,
    moe_ffn,
    moe_ffn_reference,
    moe_permute,
    moe_permute_reference,
    moe_unpermute_reference,
)

SUITE = "moe"
DTYPE = torch.bfloat16


class Shape(NamedTuple):
    name: str
    tokens: int
    experts: int
    topk: int
    hidden: int
    inter: int


ANCHORS = (Shape("anchor", 16384, 128, 8, 2048, 768), Shape("anchor", 16384, 64, 8, 2048, 768))
TRAIN = Shape("train", 8192, 128, 8, 2048, 768)
SMOKE = (Shape("smoke", 37, 6, 3, 40, 24), Shape("smoke", 20, 9, 8, 72, 16))

# Candidate configs of the kernels' tunables (veofast.kernels.moe_permute.CONFIGS), swept by ``--sections sweep``.
SWEEP = {
    "permute": [
        {"rows": rows, "tile": tile, "warps": warps}
        for rows, tile, warps in [
            *itertools.product((32, 64, 128, 256), (8192, 16384, 32768), (8,)),
            *itertools.product((32, 64, 128, 256), (16384,), (4,)),
        ]
    ],
    "unpermute": [
        {"tile": tile, "warps": warps} for tile, warps in itertools.product((4096, 8192, 16384, 32768), (4, 8))
    ],
    "unpermute_bwd": [
        {"tile": tile, "warps": warps} for tile, warps in itertools.product((2048, 4096, 8192, 16384), (4, 8))
    ],
}
FLOOR = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _kernels():
    from veofast.kernels import moe_permute as kernels

    return kernels


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


def make_inputs(shape: Shape, *, seed: int = 0) -> dict:
    dev = device()
    gen = torch.Generator(device=dev).manual_seed(seed)
    logits = torch.randn(shape.tokens, shape.experts, device=dev, generator=gen)
    weights, ids = torch.softmax(logits, dim=-1).topk(shape.topk, dim=-1)
    hidden = torch.randn(shape.tokens, shape.hidden, device=dev, generator=gen, dtype=DTYPE)
    gate_up = torch.randn(shape.experts, 2 * shape.inter, shape.hidden, device=dev, generator=gen, dtype=DTYPE)
    down = torch.randn(shape.experts, shape.hidden, shape.inter, device=dev, generator=gen, dtype=DTYPE)
    routed = shape.tokens * shape.topk
    return {
        "shape": shape,
        "hidden": hidden,
        "ids": ids,
        "weights": weights.to(DTYPE),
        "gate_up": gate_up / shape.hidden**0.5,
        "down": down / shape.inter**0.5,
        "grad": torch.randn(shape.tokens, shape.hidden, device=dev, generator=gen, dtype=DTYPE),
        "grad_rows": torch.randn(routed, shape.hidden, device=dev, generator=gen, dtype=DTYPE),
    }


def _base_row(provider: str, shape: Shape, **extra) -> dict:
    dims = {"T": shape.tokens, "E": shape.experts, "K": shape.topk, "H": shape.hidden, "I": shape.inter}
    return {"provider": provider, "shape": shape.name, **dims, **extra}


def _empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _guarded(row: dict, body) -> dict:
    """Runs body(row) filling the row; an OOM or error is recorded in it, not raised."""
    try:
        body(row)
    except torch.cuda.OutOfMemoryError:
        row["error"] = "OOM"
        print(f"note: {row['provider']} {row.get('op', '')} E={row['E']}: out of memory")
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        print(f"note: {row['provider']} {row.get('op', '')} E={row['E']} failed:\n{traceback.format_exc()}")
    _empty_cache()
    return record(SUITE, row)


def batched_ms(fn: Callable[[], object], repeats: int, *, batch: int = 10) -> float:
    """Median ms of one call, timed over back-to-back batches of ``batch`` calls (no launch gaps, as in a step)."""

    def many():
        for _ in range(batch):
            fn()

    return time_ms(many, warmup=1, repeats=repeats) / batch


# --------------------------------------------------------------------------------------- movement: the ops


def movement_bytes(shape: Shape, op: str) -> int:
    """Bytes ``op`` must move (see the module docstring); bf16 activations and weights."""
    token, weights = shape.tokens * shape.hidden, shape.tokens * shape.topk
    routed = weights * shape.hidden
    elements = {
        "permute": token + routed,
        "unpermute": routed + weights + token,
        "permute_bwd": routed + token,
        "unpermute_bwd": token + 2 * routed + 2 * weights,
    }
    return DTYPE.itemsize * elements[op]


def _close(fast: torch.Tensor, base: torch.Tensor, ref64: torch.Tensor, *, k: float = 4.0) -> tuple[bool, float]:
    """(ok, error): max |fast - ref64| <= k * max |base - ref64| + floor * max(max |ref64|, 1) (as the tests)."""
    err = (fast.double() - ref64).abs().max().item() if ref64.numel() else 0.0
    base_err = (base.double() - ref64).abs().max().item() if ref64.numel() else 0.0
    scale = max(ref64.abs().max().item() if ref64.numel() else 0.0, 1.0)
    return err <= k * base_err + FLOOR[fast.dtype] * scale, err


class Movement:
    """Inputs, references (bf16 torch and float64) and the veofast and torch calls of the four movement ops."""

    OPS = ("permute", "unpermute", "permute_bwd", "unpermute_bwd")
    CONFIG_OF = {  # op -> its kernel's entry in CONFIGS
        "permute": "permute",
        "unpermute": "unpermute",
        "permute_bwd": "unpermute",
        "unpermute_bwd": "unpermute_bwd",
    }

    def __init__(self, inp: dict):
        self.shape = shape = inp["shape"]
        self.hidden, self.ids, self.weights = inp["hidden"], inp["ids"], inp["weights"]
        self.grad, self.grad_rows = inp["grad"], inp["grad_rows"]
        self.perm = moe_permute_reference(self.hidden, self.ids, shape.experts)
        self.rows = self.perm.rows
        self.row_index = self.perm.row_index
        _, _, _, self.order = torch_permute(self.hidden, self.ids, shape.experts)
        self.torch_graphs = self._torch_graphs()

    # references: (bf16 torch, float64) per op, each a tuple of tensors
    def references(self, op: str) -> tuple[tuple, tuple]:
        shape = self.shape

        def permute_bwd(grad_rows):  # the sum of each token's rows: unpermute with unit weights
            ones = torch.ones(shape.tokens, shape.topk, device=grad_rows.device, dtype=grad_rows.dtype)
            return moe_unpermute_reference(grad_rows, self.row_index, ones)

        def unpermute_bwd(rows, weights, grad):
            rows, weights = rows.detach().requires_grad_(), weights.detach().requires_grad_()
            out = moe_unpermute_reference(rows, self.row_index, weights)
            return torch.autograd.grad(out, (rows, weights), grad)

        def both(fn, *tensors):
            return tuple(_as_tuple(fn(*tensors))), tuple(_as_tuple(fn(*(t.double() for t in tensors))))

        if op == "permute":
            ref = moe_permute_reference(self.hidden.double(), self.ids, shape.experts)
            return tuple(self.perm), tuple(ref)
        if op == "unpermute":
            return both(lambda r, w: moe_unpermute_reference(r, self.row_index, w), self.rows, self.weights)
        if op == "permute_bwd":
            return both(permute_bwd, self.grad_rows)
        return both(unpermute_bwd, self.rows, self.weights, self.grad)

    def veofast(self, op: str, config: dict | None) -> Callable[[], tuple]:
        """The launcher call (what the autograd functions run) with ``config`` for the op's kernel."""
        kernels, shape = _kernels(), self.shape
        if op == "permute":
            return lambda: kernels.permute(self.hidden, self.ids, shape.experts, config=config)
        if op == "unpermute":
            return lambda: (
                kernels.unpermute(self.rows, self.row_index, self.weights, shape.tokens, shape.topk, config=config),
            )
        if op == "permute_bwd":
            return lambda: (
                kernels.unpermute(self.grad_rows, self.row_index, None, shape.tokens, shape.topk, config=config),
            )
        return lambda: kernels.unpermute_backward(
            self.grad, self.rows, self.row_index, self.weights, rows_grad=True, weights_grad=True, config=config
        )

    def _torch_graphs(self) -> dict:
        """Forward graphs of the torch providers, kept for timing their backward with ``retain_graph``."""
        rows = self.rows.detach().requires_grad_()
        hidden = self.hidden.detach().requires_grad_()
        weights = self.weights.detach().requires_grad_()
        return {
            "permute_bwd": (hidden[self.order // self.shape.topk], (hidden,), self.grad_rows),
            "unpermute_bwd": (torch_unpermute_gather(rows, self.row_index, weights), (rows, weights), self.grad),
        }

    def torch_providers(self, op: str) -> dict[str, Callable[[], object]]:
        hidden, ids, weights, experts = self.hidden, self.ids, self.weights, self.shape.experts
        if op == "permute":
            return {"torch-argsort-gather": lambda: torch_permute(hidden, ids, experts)}
        if op == "unpermute":
            return {
                "torch-gather-mul-sum": lambda: torch_unpermute_gather(self.rows, self.row_index, weights),
                "torch-index_add": lambda: torch_unpermute_index_add(self.rows, self.order, weights),
            }
        out, inputs, grad = self.torch_graphs[op]
        name = "torch-autograd(index)" if op == "permute_bwd" else "torch-autograd(gather-mul-sum)"
        return {name: lambda: torch.autograd.grad(out, inputs, grad, retain_graph=True)}

    def check(self, op: str, outputs: tuple, refs: tuple[tuple, tuple]) -> tuple[bool, float]:
        """veofast's outputs against the float64 reference (permute: bit-exact; the rest: the tests' bound)."""
        base, ref64 = refs
        if op == "permute":  # a copy: every tensor equal, the rows equal to the float64 rows
            same = all(torch.equal(f, b) for f, b in zip(outputs[1:], base[1:], strict=True))
            err = (outputs[0].double() - ref64[0]).abs().max().item()
            return same and err == 0.0, err
        results = [_close(f, b, r) for f, b, r in zip(outputs, base, ref64, strict=True)]
        return all(ok for ok, _ in results), max(err for _, err in results)


def _as_tuple(x) -> tuple:
    return tuple(x) if isinstance(x, tuple | list) else (x,)


def bench_movement(
    inp: dict, repeats: int, *, configs: dict[str, list[dict]] | None = None, deadline: float = float("inf")
) -> list[dict]:
    """Each op: veofast with the default config, then each config in ``configs`` (until ``deadline``, which the
    ops share in proportion to their numbers of configs: new configs compile), each checked against float64
    first; then the torch providers."""
    mv = Movement(inp)
    shape = mv.shape
    rows = []
    candidates_of = {op: [None, *(configs or {}).get(Movement.CONFIG_OF[op], [])] for op in Movement.OPS}
    for i, op in enumerate(Movement.OPS):
        share = len(candidates_of[op]) / sum(len(candidates_of[o]) for o in Movement.OPS[i:])
        op_deadline = time.monotonic() + max(deadline - time.monotonic(), 0.0) * share
        nbytes = movement_bytes(shape, op)
        refs = mv.references(op)
        candidates = candidates_of[op]
        for config in candidates:
            label = "veofast" if config is None else "veofast" + "".join(f" {k}={v}" for k, v in config.items())
            row = _base_row(label, shape, op=op, config=config, dtype="bfloat16")
            if config is not None and time.monotonic() > op_deadline:
                row["error"] = "skipped: time budget"
                rows.append(record(SUITE, row))
                continue
            rows.append(_guarded(row, functools.partial(_check_and_time, mv, op, config, refs, nbytes, repeats)))
        for provider, fn in mv.torch_providers(op).items():
            row = _base_row(provider, shape, op=op, dtype="bfloat16")
            rows.append(_guarded(row, functools.partial(_timed, fn=fn, nbytes=nbytes, repeats=repeats)))
    _compare_with_torch(rows)
    return rows


def _configs_that_ran(rows: list[dict], configs: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """The configs in ``configs`` that some row of ``rows`` timed."""
    ran = {(Movement.CONFIG_OF[r["op"]], repr(r["config"])) for r in rows if r.get("config") and "ms" in r}
    return {op: [c for c in cs if (op, repr(c)) in ran] for op, cs in configs.items()}


def _check_and_time(mv: Movement, op: str, config: dict | None, refs, nbytes: int, repeats: int, row: dict) -> None:
    """veofast's ``op`` with ``config``: checked against float64 (raises if wrong), then timed."""
    fn = mv.veofast(op, config)
    with torch.no_grad():
        row["correct"], row["max_err"] = mv.check(op, _as_tuple(fn()), refs)
        if not row["correct"]:
            raise AssertionError(f"{op} {row['provider']}: error {row['max_err']:.3g} vs float64")
        _timed(row, fn=fn, nbytes=nbytes, repeats=repeats)


def _timed(row: dict, *, fn, nbytes: int, repeats: int) -> None:
    row["ms"] = batched_ms(fn, repeats)
    row["gbps"] = nbytes / row["ms"] / 1e6
    row["pct_copy"] = 100 * row["gbps"] / (H200_COPY_TBPS * 1e3)


def _compare_with_torch(rows: list[dict]) -> None:
    """x_torch: speed-up of each veofast row over the fastest torch provider of the same op."""
    best_torch = {}
    for r in rows:
        if r["provider"].startswith("torch") and "ms" in r:
            best_torch[r["op"]] = min(best_torch.get(r["op"], float("inf")), r["ms"])
    for r in rows:
        if r["provider"].startswith("veofast") and "ms" in r and r["op"] in best_torch:
            r["x_torch"] = best_torch[r["op"]] / r["ms"]


def summarize_movement(rows: list[dict]) -> None:
    """SUMMARY lines: per shape and op, the default config, the best config, the best torch, failed variants."""
    groups = collections.defaultdict(list)
    for r in rows:
        groups[(r["shape"], r["E"], r["T"], r["op"])].append(r)
    for (name, experts, tokens, op), group in groups.items():
        timed = [r for r in group if "ms" in r]
        ours = [r for r in timed if r["provider"].startswith("veofast")]
        torch_rows = [r for r in timed if r["provider"].startswith("torch")]
        default = next((r for r in ours if r.get("config") is None), None)
        best = min(ours, key=lambda r: r["ms"], default=None)
        best_torch = min(torch_rows, key=lambda r: r["ms"], default=None)
        failed = [r for r in group if "error" in r and not r["error"].startswith("skipped")]
        skipped = sum(1 for r in group if r.get("error", "").startswith("skipped"))
        parts = [f"SUMMARY {name} T={tokens} E={experts} {op}:"]
        if default:
            parts.append(f"default {default['ms'] * 1e3:.0f}us {default['gbps'] / 1e3:.2f}TB/s")
        if best and best is not default:
            parts.append(
                f"| best {best['ms'] * 1e3:.0f}us {best['gbps'] / 1e3:.2f}TB/s{best['provider'][len('veofast') :]}"
            )
        if best_torch:
            parts.append(f"| {best_torch['provider']} {best_torch['gbps'] / 1e3:.2f}TB/s")
        parts.append(f"| ok {len(ours)}/{len(ours) + len(failed)}" + (f" skipped {skipped}" if skipped else ""))
        if failed:
            parts.append("FAILED: " + "; ".join(f"{r['provider']}: {r['error'][:50]}" for r in failed[:2]))
        print(" ".join(parts))


# ------------------------------------------------------------------------------------------------ expert FFN


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_()


def bench_ffn(inp: dict, repeats: int) -> list[dict]:
    shape = inp["shape"]
    ids, grad = inp["ids"], inp["grad"]
    hidden, weights, gate_up, down = (_leaf(inp[k]) for k in ("hidden", "weights", "gate_up", "down"))
    perm = moe_permute(inp["hidden"], ids, shape.experts)
    rows_leaf = _leaf(perm.rows)
    routed = shape.tokens * shape.topk
    dense_x = _leaf(torch.randn(routed, shape.hidden, device=device(), dtype=DTYPE))
    dense_w1 = _leaf(inp["gate_up"][0].T.contiguous())
    dense_w2 = _leaf(inp["down"][0].T.contiguous())

    def dense():
        gate, up = (dense_x @ dense_w1).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ dense_w2

    # provider -> (forward, output gradient, run on veofast's own Triton grouped GEMM instead of torch._grouped_mm)
    def ffn():  # as the models call it: router ids need no range check (a host sync)
        return moe_ffn(hidden, ids, weights, gate_up, down, check_ids=False)

    providers = {
        "veofast-moe_ffn": (ffn, grad, False),
        "veofast-moe_ffn[triton-gemm]": (ffn, grad, True),
        "veofast-expert_ffn": (
            lambda: expert_ffn(rows_leaf, perm.expert_offsets, gate_up, down),
            inp["grad_rows"],
            False,
        ),
        "torch-loop": (lambda: moe_ffn_reference(hidden, ids, weights, gate_up, down), grad, False),
        "torch-grouped_mm": (lambda: torch_grouped_mm_ffn(hidden, ids, weights, gate_up, down), grad, False),
        "dense-same-flops": (dense, inp["grad_rows"], False),
    }
    leaves = (hidden, weights, gate_up, down, rows_leaf, dense_x, dense_w1, dense_w2)
    flops = 18 * routed * shape.hidden * shape.inter
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

        rows.append(_guarded(_base_row(provider, shape, op="ffn", mode="fwd+bwd", dtype="bfloat16"), body))
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
    shape = inp["shape"]
    hidden, weights, gate_up, down = (_leaf(inp[k]) for k in ("hidden", "weights", "gate_up", "down"))

    def body(row):
        moe_ffn(hidden, inp["ids"], weights, gate_up, down, check_ids=False).backward(inp["grad"])
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            moe_ffn(hidden, inp["ids"], weights, gate_up, down, check_ids=False).backward(inp["grad"])
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        row["no_host_sync"] = True

    row = _guarded(_base_row("veofast-moe_ffn", shape, check="sync_debug_mode_error"), body)
    status = "passed" if row.get("no_host_sync") else "FAILED: " + row.get("error", "")
    print(f"SUMMARY no-host-sync check moe_ffn fwd+bwd E={shape.experts}: {status}")
    return row


def check_error(inp: dict) -> list[dict]:
    """Output error of veofast and of the bf16 torch loop against the loop in fp32."""
    shape = inp["shape"]
    args = (inp["hidden"], inp["ids"], inp["weights"], inp["gate_up"], inp["down"])
    with torch.no_grad():
        ref = moe_ffn_reference(*(t.float() if t.is_floating_point() else t for t in args)).double()
        results = []
        for provider, fn in [("veofast-moe_ffn", moe_ffn), ("torch-loop", moe_ffn_reference)]:
            err = ((fn(*args).double() - ref).norm() / ref.norm()).item()
            print(f"SUMMARY moe_ffn E={shape.experts} {provider} vs fp32 loop: rel err {err:.2e}")
            results.append(record(SUITE, _base_row(provider, shape, check="rel_err_vs_fp32", rel_err=err)))
    return results


# --------------------------------------------------------------------------------------------------- profile

KERNEL_CLASSES = (  # (class, substrings of kernel names), first match wins
    ("gemm", ("gemm", "cutlass", "nvjet", "xmma", "grouped_mm", "sm90")),
    ("veofast-triton", ("_moe_", "_swiglu_")),
    ("copy/fill", ("memcpy", "memset", "fill", "copy")),
)


def _kernel_class(name: str) -> str:
    lowered = name.lower()
    for cls, needles in KERNEL_CLASSES:
        if any(n in lowered for n in needles):
            return cls
    return "torch-glue"


def profile_block(row: dict, shape: Shape, *, steps: int = 3) -> None:
    """torch.profiler of ``SparseMoeBlock`` forward + backward (bf16 weights): kernel time per class and the top
    kernels per step (on a CPU: the top-level ops' CPU time), printed and put in ``row``."""
    from torch.profiler import ProfilerActivity, profile

    from veofast.models.config import DecoderConfig
    from veofast.models.moe import SparseMoeBlock

    dev = device()
    config = DecoderConfig(
        hidden_size=shape.hidden,
        num_experts=shape.experts,
        num_experts_per_tok=shape.topk,
        moe_intermediate_size=shape.inter,
        head_dim=64,  # attention is not part of the block; any valid value
        ops_backend="auto" if dev.type == "cuda" else "triton",  # on a CPU: the kernels under the interpreter
    )
    with dev:
        block = SparseMoeBlock(config).to(DTYPE)
    gen = torch.Generator(device=dev).manual_seed(0)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, device=dev, dtype=p.dtype) * 0.02)
    x = torch.randn(shape.tokens, shape.hidden, generator=gen, device=dev, dtype=DTYPE, requires_grad=True)
    grad = torch.randn(shape.tokens, shape.hidden, generator=gen, device=dev, dtype=DTYPE)

    def step():
        out, stats = block(x)
        torch.autograd.backward((out, stats.sum()), (grad, None))

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(2):
        step()
    sync()
    on_gpu = dev.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync()
    per_kernel, per_op = _profile_tables(prof.events(), on_gpu)
    total = sum(us for us, _ in per_kernel.values()) or 1.0
    by_class = collections.Counter()
    for name, (us, _) in per_kernel.items():
        by_class[_kernel_class(name)] += us
    unit = "kernels" if on_gpu else "top-level CPU ops"
    launches = sum(count for _, count in per_kernel.values()) / steps
    print(
        f"SUMMARY profile SparseMoeBlock fwd+bwd T={shape.tokens} E={shape.experts} K={shape.topk} H={shape.hidden} "
        f"I={shape.inter}: {total / steps:.0f}us in {launches:.0f} {unit} per step; "
        + ", ".join(f"{cls} {100 * us / total:.0f}%" for cls, us in by_class.most_common())
    )
    row.update(us_per_step=total / steps, launches_per_step=launches)
    row["by_class_pct"] = {cls: 100 * us / total for cls, us in by_class.items()}
    for title, table, count in (("by launching op", per_op, 9), ("top kernels", per_kernel, 7)):
        top = sorted(table.items(), key=lambda kv: -kv[1][0])[:count]
        print(f"SUMMARY  {title} (per step: us, launches, % of all):")
        for name, (us, n) in top:
            print(f"SUMMARY   {us / steps:6.0f}us {n / steps:3.0f}x {100 * us / total:4.1f}% {name[:64]}")
        row[title.replace(" ", "_")] = [(name[:120], us / steps, n / steps) for name, (us, n) in top]


def _profile_tables(events, on_gpu: bool) -> tuple[dict, dict]:
    """``({kernel name: [us, count]}, {top-level CPU op that launched them: [us, count]})`` over the events (kernels
    linked to no CPU op: ``(no CPU op)``); on a CPU (no kernels), both hold the top-level CPU ops' CPU time."""
    per_kernel: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    per_op: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for e in events:
        if on_gpu and str(e.device_type).endswith("CUDA"):
            per_kernel[e.name][0] += float(e.time_range.elapsed_us())
            per_kernel[e.name][1] += 1
        if not str(e.device_type).endswith("CPU"):
            continue
        top = e
        while top.cpu_parent is not None:
            top = top.cpu_parent
        if on_gpu:
            for k in getattr(e, "kernels", None) or []:
                per_op[top.name][0] += float(k.duration)
                per_op[top.name][1] += 1
        elif e is top:
            for table in (per_kernel, per_op):
                table[e.name][0] += float(e.cpu_time_total)
                table[e.name][1] += 1
    if on_gpu:
        rest = [sum(v[i] for v in per_kernel.values()) - sum(v[i] for v in per_op.values()) for i in (0, 1)]
        if rest[1] > 0:
            per_op["(no CPU op)"] = rest
    return per_kernel, per_op


# ------------------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="E=128 only")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--sections",
        nargs="+",
        default=["checks", "movement", "ffn"],
        choices=["checks", "movement", "sweep", "ffn", "profile"],
    )
    parser.add_argument("--budget-s", type=float, default=float("inf"), help="stop sweeping new configs after this")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, few configs: runs on a CPU (interpreter)")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.smoke:
        raise SystemExit("bench/moe.py needs a CUDA GPU (or --smoke with TRITON_INTERPRET=1)")
    deadline = time.monotonic() + args.budget_s
    anchors, train = (SMOKE, SMOKE[0]) if args.smoke else (ANCHORS[:1] if args.quick else ANCHORS, TRAIN)
    sweep = {op: configs[:2] for op, configs in SWEEP.items()} if args.smoke else SWEEP
    repeats = 2 if args.smoke else args.repeats
    sections = set(args.sections)
    movement, ffn = [], []
    shapes = [anchors[0], train, *anchors[1:]] if "sweep" in sections and not args.smoke else list(anchors)
    if not sections & {"checks", "movement", "sweep", "ffn"}:
        shapes = []
    for shape in shapes:
        inp = make_inputs(shape)
        if "checks" in sections and shape.name == "anchor":
            check_error(inp)
            check_no_sync(inp)
        if "sweep" in sections or "movement" in sections:
            rows = bench_movement(inp, repeats, configs=sweep if "sweep" in sections else None, deadline=deadline)
            summarize_movement(rows)
            movement += rows
            if "sweep" in sections:  # later shapes: the configs that ran here (compiled), with no time limit
                sweep = _configs_that_ran(rows, sweep)
                deadline = float("inf")
        if "ffn" in sections and shape.name == "anchor":
            ffn += bench_ffn(inp, repeats)
        del inp
        _empty_cache()
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    if movement:
        print(
            f"\nMoE token movement, bf16, {name}; GB/s of the bytes an op must move; copy ceiling {H200_COPY_TBPS} TB/s"
        )
        print_table(movement, ["shape", "E", "op", "provider", "ms", "gbps", "pct_copy", "x_torch", "max_err", "error"])
    if ffn:
        print(f"\nMoE expert FFN fwd+bwd, bf16, {name}; flops 18*T*K*H*I")
        columns = ["provider", "E", "ms", "tflops", "pct_dense", "x_loop", "pct_peak", "extra_peak_gib", "error"]
        print_table(ffn, columns)
    if "profile" in sections:
        _guarded(_base_row("veofast-SparseMoeBlock", train, check="profile"), lambda row: profile_block(row, train))


if __name__ == "__main__":
    main()
