"""Throughput of the decoder's small fused ops: RMSNorm (plain and with the residual add), RoPE and SwiGLU.

Two sections:

- ``providers``: veofast (its pinned configs), torch eager written the way HF writes the op (RoPE with cos/sin
  precomputed once, as HF shares them across layers), ``torch.compile`` of the same, and liger-kernel
  (``LigerRMSNorm``, ``LigerFusedAddRMSNorm``, ``liger_rotary_pos_emb``, ``LigerSiLUMulFunction``) when it imports;
  forward and forward+backward. ``err``/``gerr``: largest error of the outputs / gradients against a float64
  reference, relative to the reference's largest value.
- ``sweep``: each veofast launcher (forward and backward, called directly) at every config of its kernel
  module's ``candidates()``. A config is timed only after its bf16 outputs pass the float64 check
  ``|out - ref64| <= 2 |torch_bf16 - ref64| + 2e-2 max|ref64|``; the summary names the best config per ``CONFIGS``
  entry (geometric mean over the shapes that share the entry), to be pinned in the kernel module.

GB/s counts the bytes that a fused kernel must read and write (the same count for every provider, so a provider
that moves more, e.g. cos/sin tensors or dweight partials, shows as slower); ``%copy`` is that against the
4.21 TB/s device-to-device copy ceiling of an H200. ``ms`` is GPU time per call in steady state: a batch of calls
is queued behind a GPU sleep long enough for the host to enqueue all of them, so the host's launch overhead (which
a training step hides behind earlier kernels) is not counted. ``ms_sync`` is the latency of one call from an idle
GPU, host overhead included (the figure earlier versions of this suite reported).

    python bench/small_ops.py [--sections providers,sweep] [--shapes bench,train] [--quick] [--ops rms_norm,...]
    bash tools/gpu_jobs/small_ops.sh   # the GPU job: sweep, providers and a summary in under 300 s
    python bench/small_ops.py --summarize results/small_ops.jsonl
    TRITON_INTERPRET=1 python bench/small_ops.py --smoke   # CPU, tiny shapes: checks that everything runs
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.append(str(Path(__file__).resolve().parents[1]))  # for ``bench``; an installed veofast comes first

from bench.common import H200_COPY_TBPS, peak_extra_gib, print_table, record, time_ms  # noqa: E402
from veofast.ops.norm import rms_norm, rms_norm_reference  # noqa: E402
from veofast.ops.rope import apply_rotary, apply_rotary_reference  # noqa: E402
from veofast.ops.swiglu import swiglu, swiglu_reference  # noqa: E402

PROVIDERS = ("veofast", "torch", "torch.compile", "liger")
OPS = ("rms_norm", "rope", "swiglu")
EPS = 1e-6
FLOOR = 2e-2  # bf16 error floor, relative to the reference's largest value (as in tests/ops)

# (op, arguments of its builder, in --quick). bench: the suite's headline shapes (131072 x 768: 16384 tokens x top-8
# rows of an expert FFN); train: Llama-3.2-1B (8192 tokens, hidden 2048, 32/8 heads of 64, FFN 8192) and
# Qwen3-30B-A3B (hidden 2048, 32/4 heads of 128, qk-norm over 8192 x 32 q heads of 128).
SHAPES = {
    "bench": [
        ("rms_norm", (16384, 4096, True), True),
        ("rms_norm", (16384, 4096, False), False),
        ("rms_norm", (16384, 2048, True), False),
        ("rope", (16384, 32, 8, 128), True),
        ("rope", (16384, 32, 8, 64), False),
        ("swiglu", (16384, 8192), True),
        ("swiglu", (131072, 768), True),
    ],
    "train": [
        ("rms_norm", (8192, 2048, True), True),
        ("rms_norm", (262144, 128, False), False),
        ("rope", (8192, 32, 8, 64), True),
        ("rope", (8192, 32, 4, 128), True),
        ("swiglu", (8192, 8192), True),
    ],
    "smoke": [
        ("rms_norm", (37, 96, True), True),
        ("rms_norm", (70, 64, False), True),
        ("rope", (13, 4, 2, 16), True),
        ("swiglu", (37, 80), True),
    ],
}


@dataclass
class Case:
    """One op at one shape for the providers section: inputs, a callable per provider, the bytes a fused kernel
    moves, the op in plain torch (run in float64 for the expected outputs and gradients) and the gradients of
    the outputs that the backward starts from."""

    op: str
    shape: str
    inputs: list[torch.Tensor]
    providers: dict[str, Callable]
    bytes_fwd: int
    bytes_bwd: int
    reference: Callable
    grad_outputs: list[torch.Tensor]


@dataclass
class KernelCase:
    """One launcher at one shape for the sweep: ``launch(config)`` (timed) and ``extra(config)`` (checked only)
    return outputs, checked against ``expected`` (float64) with the bound made of ``torch_err`` (the error of the
    torch op in bf16, per output)."""

    op: str
    kernel: str
    shape: str
    entry: str  # the CONFIGS entry that the configs of this kernel and shape belong to
    launch: Callable[[dict], tuple[torch.Tensor, ...]]
    expected: tuple[torch.Tensor, ...]
    torch_err: tuple[float, ...]
    n_bytes: int
    configs: list[dict]
    pinned: dict
    extra: Callable[[dict], tuple[torch.Tensor, ...]] = lambda config: ()


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _randn(*shape, dtype=torch.bfloat16):
    return torch.randn(*shape, device=_device(), dtype=dtype)


def _as_tuple(out) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, tuple | list) else (out,)


def _max_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    return (got.double() - expected).abs().max().item()


def _reference64(fn: Callable, inputs: list[torch.Tensor], grad_outputs: list[torch.Tensor] | None):
    """(outputs, gradients w.r.t. all inputs) of ``fn`` in float64; gradients only with ``grad_outputs``."""
    leaves = [t.detach().double().requires_grad_(grad_outputs is not None) for t in inputs]
    with torch.enable_grad():
        outs = _as_tuple(fn(*leaves))
        grads = () if grad_outputs is None else torch.autograd.grad(outs, leaves, [g.double() for g in grad_outputs])
    return tuple(o.detach() for o in outs), tuple(grads)


def _liger(name: str):
    """The liger-kernel object ``name`` (see the table below), or None with the reason printed once."""
    try:
        if name == "rms_norm":
            from liger_kernel.transformers.rms_norm import LigerRMSNorm as obj
        elif name == "add_rms_norm":
            from liger_kernel.transformers.fused_add_rms_norm import LigerFusedAddRMSNorm as obj
        elif name == "rope":
            from liger_kernel.transformers.rope import liger_rotary_pos_emb as obj
        else:
            from liger_kernel.ops.swiglu import LigerSiLUMulFunction as obj
    except Exception as exc:  # not installed, or a version without this op
        print(f"note: liger-kernel {name} skipped ({type(exc).__name__}: {str(exc)[:100]})")
        return None
    return obj


# ---------------------------------------------------------------------------------------------------- op builders


def _rms_norm_bytes(n_rows: int, hidden: int, with_residual: bool, elem: int) -> tuple[int, int]:
    """fwd: x (+ residual) in, y (+ h) out, weight in. bwd: dy (+ dh), h in, dx out, weight in, dweight out."""
    tensor = n_rows * hidden * elem
    fwd = (4 if with_residual else 2) * tensor + hidden * elem
    bwd = (4 if with_residual else 3) * tensor + 2 * hidden * elem
    return fwd, bwd


def rms_norm_case(n_rows: int, hidden: int, with_residual: bool, compile_backend: str) -> Case:
    x, residual, weight = _randn(n_rows, hidden), _randn(n_rows, hidden), 1 + 0.1 * _randn(hidden)
    if with_residual:
        inputs = [x, residual, weight]
        reference = lambda x, r, w: rms_norm_reference(x, w, EPS, residual=r)
        providers = {"veofast": lambda x, r, w: rms_norm(x, w, EPS, residual=r, backend="triton"), "torch": reference}
        liger_cls = _liger("add_rms_norm")
        grad_outputs = [_randn(n_rows, hidden), _randn(n_rows, hidden)]
    else:
        inputs = [x, weight]
        reference = lambda x, w: rms_norm_reference(x, w, EPS)
        providers = {"veofast": lambda x, w: rms_norm(x, w, EPS, backend="triton"), "torch": reference}
        liger_cls = _liger("rms_norm")
        grad_outputs = [_randn(n_rows, hidden)]
    providers["torch.compile"] = torch.compile(reference, dynamic=False, backend=compile_backend)
    if liger_cls is not None:
        module = liger_cls(hidden, eps=EPS).to(device=x.device, dtype=x.dtype)
        if with_residual:
            providers["liger"] = lambda x, r, w: torch.func.functional_call(module, {"weight": w}, (x, r))
        else:
            providers["liger"] = lambda x, w: torch.func.functional_call(module, {"weight": w}, (x,))
    name = "rms_norm+residual" if with_residual else "rms_norm"
    bytes_fwd, bytes_bwd = _rms_norm_bytes(n_rows, hidden, with_residual, x.element_size())
    return Case(name, f"{n_rows}x{hidden}", inputs, providers, bytes_fwd, bytes_bwd, reference, grad_outputs)


def _rms_norm(x, w, r=None):
    """veofast's reference with the suite's eps, inputs in the launchers' order."""
    return rms_norm_reference(x, w, EPS, residual=r)


def rms_norm_kernels(n_rows: int, hidden: int, with_residual: bool) -> list[KernelCase]:
    from veofast.kernels import norm

    x, residual, weight = _randn(n_rows, hidden), _randn(n_rows, hidden), 1 + 0.1 * _randn(hidden)
    dy, dh_out = _randn(n_rows, hidden), _randn(n_rows, hidden)
    r = residual if with_residual else None
    name, shape = ("rms_norm+residual" if with_residual else "rms_norm"), f"{n_rows}x{hidden}"
    bytes_fwd, bytes_bwd = _rms_norm_bytes(n_rows, hidden, with_residual, x.element_size())
    key = norm.table_key(hidden)
    cases = []

    # Forward: y (and h) against the float64 op of the same bf16 inputs.
    expected, _ = _reference64(_rms_norm, [x, weight, r] if with_residual else [x, weight], None)
    torch_err = tuple(_max_err(o, e) for o, e in zip(_as_tuple(_rms_norm(x, weight, r)), expected, strict=True))
    cases.append(
        KernelCase(
            name,
            "fwd",
            shape,
            f"norm.CONFIGS['fwd'][{key}]",
            lambda cfg: tuple(t for t in norm.rms_norm_fwd(x, weight, r, EPS, x.dtype, config=cfg) if t is not None),
            expected,
            torch_err,
            bytes_fwd,
            norm.candidates("fwd", hidden),
            norm.config_for("fwd", hidden),
        )
    )

    # Backward: (dx, dweight) of y(h) at the bf16 h, plus dh_out (the residual stream's gradient) when fused.
    h = (x + residual) if with_residual else x
    _, (dh64, dw64) = _reference64(_rms_norm, [h, weight], [dy])
    dx64 = dh64 + dh_out.double() if with_residual else dh64
    h_leaf, w_leaf = h.detach().requires_grad_(), weight.detach().requires_grad_()
    with torch.enable_grad():
        dh_t, dw_t = torch.autograd.grad(_rms_norm(h_leaf, w_leaf), [h_leaf, w_leaf], dy)
    dx_t = dh_t + dh_out if with_residual else dh_t
    cases.append(
        KernelCase(
            name,
            "bwd",
            shape,
            f"norm.CONFIGS['bwd'][{key}]",
            lambda cfg: norm.rms_norm_bwd(dy, h, weight, dh_out if with_residual else None, EPS, config=cfg),
            (dx64, dw64),
            (_max_err(dx_t, dx64), _max_err(dw_t, dw64)),
            bytes_bwd,
            norm.candidates("bwd", hidden),
            norm.config_for("bwd", hidden),
        )
    )
    return cases


def _rope_inputs(n_tokens: int, n_q: int, n_k: int, head_dim: int):
    """q, k, packed position_ids (documents of 64-4095 tokens, restarting at 0), inv_freq."""
    q, k = _randn(n_tokens, n_q, head_dim), _randn(n_tokens, n_k, head_dim)
    lengths = torch.randint(64, 4096, (n_tokens // 64 + 1,))
    position_ids = torch.cat([torch.arange(int(n)) for n in lengths])[:n_tokens].to(q.device)
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2, device=q.device, dtype=torch.float32) / head_dim)
    return q, k, position_ids, inv_freq


def _rope_bytes(q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor) -> int:
    """q, k in; q_out, k_out out; positions and frequencies in (the same count for the backward)."""
    return (
        2 * (q.numel() + k.numel()) * q.element_size()
        + position_ids.numel() * position_ids.element_size()
        + (inv_freq.numel() * 4)
    )


def rope_case(n_tokens: int, n_q: int, n_k: int, head_dim: int, compile_backend: str) -> Case:
    q, k, position_ids, inv_freq = _rope_inputs(n_tokens, n_q, n_k, head_dim)
    freqs = position_ids.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(q.dtype), emb.sin().to(q.dtype)  # (T, D), computed once per step as in HF

    def hf_rope(q, k):
        def rot(x):
            half = x.shape[-1] // 2
            return x * cos[:, None] + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin[:, None]

        return rot(q), rot(k)

    def veofast(q, k):  # in place, as the models call it, except on leaves that require grad (the fwd+bwd rows)
        inplace = not (q.requires_grad and q.is_leaf)
        return apply_rotary(q, k, position_ids, inv_freq, inplace=inplace, backend="triton")

    providers = {
        "veofast": veofast,
        "torch": hf_rope,
        "torch.compile": torch.compile(hf_rope, dynamic=False, backend=compile_backend),
    }
    liger_rope = _liger("rope")
    if liger_rope is not None:

        def liger(q, k):  # liger wants (1, H, T, D) views of (1, T, H, D) storage and (1, T, D) cos/sin
            q_out, k_out = liger_rope(q[None].transpose(1, 2), k[None].transpose(1, 2), cos[None], sin[None])
            return q_out.transpose(1, 2)[0], k_out.transpose(1, 2)[0]

        providers["liger"] = liger
    reference = lambda q, k: apply_rotary_reference(q, k, position_ids, inv_freq)
    n_bytes = _rope_bytes(q, k, position_ids, inv_freq)
    grad_outputs = [torch.randn_like(q), torch.randn_like(k)]
    return Case(
        "rope", f"T{n_tokens} {n_q}/{n_k}h d{head_dim}", [q, k], providers, n_bytes, n_bytes, reference, grad_outputs
    )


def rope_kernels(n_tokens: int, n_q: int, n_k: int, head_dim: int) -> list[KernelCase]:
    """The rotation (forward); each config's inverse rotation (the backward: the same kernel, the same bytes) is
    checked too, not timed."""
    from veofast.kernels import rope

    q, k, position_ids, inv_freq = _rope_inputs(n_tokens, n_q, n_k, head_dim)
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    reference = lambda q, k: apply_rotary_reference(q, k, position_ids, inv_freq)
    expected, grads64 = _reference64(reference, [q, k], [dq, dk])
    q_leaf, k_leaf = q.detach().requires_grad_(), k.detach().requires_grad_()
    with torch.enable_grad():
        outs_t = reference(q_leaf, k_leaf)
        grads_t = torch.autograd.grad(outs_t, [q_leaf, k_leaf], [dq, dk])

    return [
        KernelCase(
            "rope",
            "fwd",
            f"T{n_tokens} {n_q}/{n_k}h d{head_dim}",
            f"rope.CONFIGS[{rope.table_key(head_dim)}]",
            lambda cfg: rope.rotary(q, k, position_ids, inv_freq, 1.0, False, config=cfg),
            expected + grads64,
            tuple(_max_err(o, e) for o, e in zip(tuple(outs_t) + grads_t, expected + grads64, strict=True)),
            _rope_bytes(q, k, position_ids, inv_freq),
            rope.candidates(head_dim),
            rope.config_for(head_dim),
            extra=lambda cfg: rope.rotary(dq, dk, position_ids, inv_freq, 1.0, True, config=cfg),
        )
    ]


def swiglu_case(n_rows: int, inter: int, compile_backend: str) -> Case:
    gate, up = _randn(n_rows, inter), _randn(n_rows, inter)

    def hf_swiglu(gate, up):
        return F.silu(gate) * up

    providers = {
        "veofast": lambda g, u: swiglu(g, u, backend="triton"),
        "torch": hf_swiglu,
        "torch.compile": torch.compile(hf_swiglu, dynamic=False, backend=compile_backend),
    }
    liger_fn = _liger("swiglu")
    if liger_fn is not None:
        providers["liger"] = lambda g, u: liger_fn.apply(g, u)
    tensor = gate.numel() * gate.element_size()
    # fwd: gate, up in, y out; bwd: dy, gate, up in, dgate, dup out
    grad_outputs = [torch.randn_like(gate)]
    return Case(
        "swiglu", f"{n_rows}x{inter}", [gate, up], providers, 3 * tensor, 5 * tensor, swiglu_reference, grad_outputs
    )


def swiglu_kernels(n_rows: int, inter: int) -> list[KernelCase]:
    from veofast.kernels import swiglu as kernels

    gate, up, dy = _randn(n_rows, inter), _randn(n_rows, inter), _randn(n_rows, inter)
    (y64,), grads64 = _reference64(swiglu_reference, [gate, up], [dy])
    g_leaf, u_leaf = gate.detach().requires_grad_(), up.detach().requires_grad_()
    with torch.enable_grad():  # HF's bf16 op: silu rounded to bf16 before the product
        y_t = F.silu(g_leaf) * u_leaf
        grads_t = torch.autograd.grad(y_t, [g_leaf, u_leaf], dy)
    tensor, shape = gate.numel() * gate.element_size(), f"{n_rows}x{inter}"
    return [
        KernelCase(
            "swiglu",
            "fwd",
            shape,
            "swiglu.CONFIGS['fwd']",
            lambda cfg: (kernels.swiglu_fwd(gate, up, config=cfg),),
            (y64,),
            (_max_err(y_t, y64),),
            3 * tensor,
            kernels.candidates("fwd"),
            kernels.config_for("fwd"),
        ),
        KernelCase(
            "swiglu",
            "bwd",
            shape,
            "swiglu.CONFIGS['bwd']",
            lambda cfg: kernels.swiglu_bwd(dy, gate, up, config=cfg),
            grads64,
            tuple(_max_err(g, e) for g, e in zip(grads_t, grads64, strict=True)),
            5 * tensor,
            kernels.candidates("bwd"),
            kernels.config_for("bwd"),
        ),
    ]


BUILDERS = {
    "rms_norm": (rms_norm_case, rms_norm_kernels),
    "rope": (rope_case, rope_kernels),
    "swiglu": (swiglu_case, swiglu_kernels),
}


# --------------------------------------------------------------------------------------------------------- timing


def gpu_ms(fn: Callable[[], object], *, warmup: int, repeats: int, inner: int = 10) -> float:
    """Median GPU time per call of ``fn()`` in steady state, in milliseconds (host time per call on CPU).

    Each timed batch of ``inner`` calls is queued behind a GPU sleep that lasts longer than the host needs to
    enqueue the batch, so the batch runs back to back, as kernels do inside a training step.
    """
    if not torch.cuda.is_available():
        return time_ms(fn, warmup=warmup, repeats=repeats)
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    host_s = time.perf_counter() - t0
    torch.cuda.synchronize()
    sleep_cycles = int(2e9 * 2 * host_s) + 10_000  # ~2 GHz: twice the host's enqueue time
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(sleep_cycles)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return statistics.median(times)


def _throughput(n_bytes: int, ms: float) -> dict:
    gbps = n_bytes / ms / 1e6
    return {"ms": ms, "GB/s": gbps, "%copy": 100 * gbps / (H200_COPY_TBPS * 1e3)}


# ------------------------------------------------------------------------------------------------------- sections


def run_providers(case: Case, providers: list[str], warmup: int, repeats: int) -> list[dict]:
    """Each provider's forward and forward+backward: errors against float64, steady-state and synced times."""
    rows = []
    expected, grads64 = _reference64(case.reference, case.inputs, case.grad_outputs)
    leaves = [t.detach().requires_grad_() for t in case.inputs]
    dtype = str(case.inputs[0].dtype).removeprefix("torch.")
    # In PROVIDERS order, liger last: its kernels write into their inputs and grad_outputs.
    for name in [p for p in PROVIDERS if p in providers and p in case.providers]:
        fn = case.providers[name]
        base = {"section": "providers", "op": case.op, "shape": case.shape, "dtype": dtype, "provider": name}
        try:
            clones = [t.detach().clone().requires_grad_() for t in case.inputs]
            got = _as_tuple(fn(*clones))
            grads = torch.autograd.grad(got, clones, [g.clone() for g in case.grad_outputs])
            scale = lambda refs: max(r.abs().max().item() for r in refs)
            err = max(_max_err(g, e) for g, e in zip(got, expected, strict=True)) / scale(expected)
            gerr = max(_max_err(g, e) for g, e in zip(grads, grads64, strict=True)) / scale(grads64)

            def fwd(fn=fn):
                with torch.no_grad():
                    fn(*case.inputs)

            def fwd_bwd(fn=fn):
                outs = _as_tuple(fn(*leaves))
                torch.autograd.grad(outs, leaves, case.grad_outputs)

            modes = [("fwd", fwd, case.bytes_fwd), ("fwd+bwd", fwd_bwd, case.bytes_fwd + case.bytes_bwd)]
            for mode, step, n_bytes in modes:
                ms = gpu_ms(step, warmup=warmup, repeats=repeats)
                ms_sync = time_ms(step, warmup=1, repeats=repeats)
                row = {**base, "mode": mode, **_throughput(n_bytes, ms), "ms_sync": ms_sync, "err": err, "gerr": gerr}
                row["peak_gib"] = peak_extra_gib(step) if mode == "fwd+bwd" else None
                rows.append(row)
                record("small_ops", row)
        except Exception as exc:  # a provider that fails is reported, and the others still run
            message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
            rows.append({**base, "mode": "-", "error": message})
            record("small_ops", {**base, "error": message})
    return rows


def run_sweep(case: KernelCase, warmup: int, repeats: int) -> list[dict]:
    """Every config of ``case``: checked against float64, then timed (only when it passes)."""
    rows = []
    for config in case.configs:
        row = {"section": "sweep", "op": case.op, "kernel": case.kernel, "shape": case.shape, "entry": case.entry}
        row |= {"config": config, "pinned": config == case.pinned}
        try:
            outs = tuple(case.launch(config)) + tuple(case.extra(config))
            errors, ok = [], True
            for out, ref, torch_err in zip(outs, case.expected, case.torch_err, strict=True):
                error = _max_err(out, ref)
                errors.append(error)
                ok &= error <= 2 * torch_err + FLOOR * max(1.0, ref.abs().max().item())  # NaN fails too
            row |= {"ok": bool(ok), "err": max(errors)}
            if ok:
                row |= _throughput(
                    case.n_bytes, gpu_ms(lambda c=config: case.launch(c), warmup=warmup, repeats=repeats)
                )
        except Exception as exc:  # e.g. a config that does not compile: reported, the others still run
            row |= {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:160]}"}
        rows.append(row)
        record("small_ops", row)
    return rows


# -------------------------------------------------------------------------------------------------------- summary


def _config_text(config: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in config.items())


def _tbps(row: dict | None) -> str:
    return f"{row['GB/s'] / 1e3:.2f}" if row and row.get("GB/s") else "-"


def _entry_lines(sweep: dict[tuple, dict]) -> list[str]:
    """Per CONFIGS entry: the config with the best geometric mean over the entry's shapes (passing on all)."""
    lines = ["== sweep: config to pin per CONFIGS entry (best geometric mean of TB/s over its shapes, all passing)"]
    speeds: dict[str, dict[str, list[float]]] = {}  # entry -> config -> GB/s, one per shape
    shapes: dict[str, set] = {}
    pinned: dict[str, str] = {}
    for (entry, op, kernel, shape, config), row in sweep.items():
        shapes.setdefault(entry, set()).add((op, kernel, shape))
        pinned.update({entry: config} if row.get("pinned") else {})
        if row.get("GB/s"):
            speeds.setdefault(entry, {}).setdefault(config, []).append(row["GB/s"])
    for entry, by_config in speeds.items():
        n_shapes = len(shapes[entry])
        geo = {c: math.exp(statistics.fmean(map(math.log, v))) for c, v in by_config.items() if len(v) == n_shapes}
        if geo:
            best = max(geo, key=geo.get)
            gain = f", {geo[best] / geo[pinned[entry]]:.2f}x pinned" if pinned.get(entry) in geo else ""
            lines.append(f"{entry} = {best}  # {geo[best] / 1e3:.2f} TB/s{gain}")
    return lines


def _shape_lines(sweep: dict[tuple, dict]) -> list[str]:
    """Per kernel and shape: TB/s of the pinned config and of the best passing one; failed configs."""
    lines = ["== sweep per kernel and shape: passing/all, TB/s of the pinned config -> the best one (config)"]
    groups: dict[tuple, list[dict]] = {}
    for key, row in sweep.items():
        groups.setdefault(key[1:4], []).append(row)
    for (op, kernel, shape), group in groups.items():
        timed = [r for r in group if r.get("GB/s")]
        best = max(timed, key=lambda r: r["GB/s"], default=None)
        pinned = next((r for r in timed if r.get("pinned")), None)
        n_ok = sum(bool(r.get("ok")) for r in group)
        result = f"{_tbps(pinned)} -> {_tbps(best)} ({_config_text(best['config'])})" if best else "none passed"
        lines.append(f"{op} {kernel} {shape} {n_ok}/{len(group)}: {result}")
    failed = [r for r in sweep.values() if not r.get("ok")]
    for r in failed[:6]:
        reason = r.get("error") or f"err {r.get('err', float('nan')):.3g} above the bound"
        lines.append(f"FAILED {r['op']} {r['kernel']} {r['shape']} {_config_text(r['config'])}: {reason[:120]}")
    return lines


def _provider_lines(providers: dict[tuple, dict]) -> list[str]:
    """Per op and shape: each provider's fwd / fwd+bwd TB/s; veofast's errors against float64."""
    lines = ["== providers, TB/s fwd/fwd+bwd (copy 4.21); veofast err/gerr = max error of outputs/grads vs float64"]
    for op, shape in dict.fromkeys(key[:2] for key in providers):
        cells = []
        for name in PROVIDERS:
            fwd, both = providers.get((op, shape, "fwd", name)), providers.get((op, shape, "fwd+bwd", name))
            failed = providers.get((op, shape, "-", name))
            if fwd or both:
                cells.append(f"{name} {_tbps(fwd)}/{_tbps(both)}")
                if name == "veofast":
                    cells[-1] += f" ({(fwd or both)['err']:.0e}/{(fwd or both)['gerr']:.0e})"
            elif failed:
                cells.append(f"{name} FAILED {failed['error'][:50]}")
        lines.append(f"{op} {shape}: " + ", ".join(cells))
    return lines


def summarize(rows: list[dict]) -> str:
    """A compact text summary of sweep and provider rows (the newest row of each measurement wins)."""
    sweep, providers = {}, {}
    for row in rows:
        if row.get("section") == "sweep":
            sweep[(row["entry"], row["op"], row["kernel"], row["shape"], json.dumps(row["config"]))] = row
        elif row.get("section") == "providers":
            providers[(row["op"], row["shape"], row.get("mode", "-"), row["provider"])] = row
    lines = ["small ops: GPU time in steady state, TB/s of the bytes the fused op must read + write"]
    if sweep:
        lines += _entry_lines(sweep)
    if providers:
        lines += _provider_lines(providers)
    if sweep:
        lines += _shape_lines(sweep)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="providers", help="comma-separated subset of providers,sweep")
    parser.add_argument("--shapes", default="bench", help="comma-separated subset of bench,train")
    parser.add_argument("--quick", action="store_true", help="headline shapes only, fewer timed runs")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (with TRITON_INTERPRET=1)")
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {OPS}")
    parser.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma-separated subset of {PROVIDERS}")
    parser.add_argument("--repeats", type=int, help="timed batches per measurement (default 20, 10 with --quick)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend of that provider")
    parser.add_argument("--summarize", metavar="JSONL", help="only print the summary of a results file")
    args = parser.parse_args()
    if args.summarize:
        with open(args.summarize) as f:
            print(summarize([json.loads(line) for line in f if line.strip()]))
        return
    if args.smoke and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("--smoke runs the Triton kernels on CPU: set TRITON_INTERPRET=1")
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("bench/small_ops.py needs a CUDA GPU (or --smoke with TRITON_INTERPRET=1)")
    providers, ops, sections = args.providers.split(","), args.ops.split(","), args.sections.split(",")
    for name, given, allowed in (("providers", providers, PROVIDERS), ("ops", ops, OPS)):
        if set(given) - set(allowed):
            parser.error(f"--{name}: unknown {sorted(set(given) - set(allowed))}; choose from {allowed}")
    if set(sections) - {"providers", "sweep"}:
        parser.error(f"--sections: choose from providers,sweep; got {args.sections}")
    shape_sets = ["smoke"] if args.smoke else args.shapes.split(",")
    if set(shape_sets) - set(SHAPES):
        parser.error(f"--shapes: choose from bench,train; got {args.shapes}")
    warmup, repeats = (1, 2) if args.smoke else (3, 10) if args.quick else (5, 20)
    repeats = args.repeats or repeats
    torch.manual_seed(0)

    plan = [(op, a) for s in shape_sets for op, a, in_quick in SHAPES[s] if op in ops and (in_quick or not args.quick)]
    rows = []
    for section in sections:
        for op, build_args in plan:
            start = time.perf_counter()
            case_builder, kernels_builder = BUILDERS[op]
            try:
                if section == "providers":
                    rows += run_providers(case_builder(*build_args, args.compile_backend), providers, warmup, repeats)
                else:
                    for case in kernels_builder(*build_args):
                        rows += run_sweep(case, warmup, repeats)
            except Exception as exc:  # a shape that cannot be built (e.g. out of memory) must not stop the others
                print(f"{section} {op} {build_args}: {type(exc).__name__}: {str(exc)[:200]}")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            print(f"[{section} {op} {build_args}: {time.perf_counter() - start:.1f} s]", flush=True)
    print(summarize(rows))
    if "providers" in sections:
        table = [r for r in rows if r.get("section") == "providers"]
        columns = ["op", "shape", "mode", "provider", "ms", "ms_sync", "GB/s", "%copy", "err", "gerr", "peak_gib"]
        print_table(table, columns + ["error"])


if __name__ == "__main__":
    main()
