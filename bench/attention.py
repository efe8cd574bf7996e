"""Benchmark of packed varlen causal attention (the ANCHORS.md shape: 32768 tokens, 19 documents of 64..4096,
32 query / 8 KV heads, head_dim 128, bf16), providers side by side in one process:

- ``veofast``: ``varlen_attention`` (Triton kernels);
- ``torch_varlen``: ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention-2 inside), causal via
  ``window_size=(-1, 0)`` or ``is_causal=True``, whichever this torch has;
- ``flex``: FlexAttention compiled, with a document-causal block mask built once per shape (inputs laid out
  ``(1, H, T, D)`` outside the timing);
- ``sdpa_loop``: SDPA (flash) called once per document;
- ``sdpa_cudnn``: SDPA on cuDNN's fused attention over a (documents, heads, length, dim) batch, where all documents
  have one length (the uniform shapes): the strongest peer there. It has no packed path here: its ragged layout
  (``aten._cudnn_attention_forward`` with ``cum_seq_q``) took 50-75 ms per call in torch 2.11 (a graph build each
  call), and torch's own ``varlen_attn`` keeps it switched off;
- ``reference``: ``varlen_attention_reference``, at the small shape only.

FLOPs count the causal pairs only: fwd = 4 * head_dim * num_q_heads * sum(L (L + 1) / 2), fwd+bwd = 3.5 * fwd.
Shapes: the anchor mix, uniform documents of 512/2048/8192/32768 tokens, head_dim 64 and 256 at the anchor mix,
one 8192-token document with head_dim 64 (the Llama-3.2-1B training shape), a 1-token document among long ones,
and a small mix (``--shapes`` picks some by name, ``--providers`` some providers). Also checks that a veofast
fwd+bwd never syncs with the host, and the output difference against ``sdpa_loop``. A failing provider is
reported, not fatal.

``--sweep`` (the GPU job ``tools/gpu_jobs/attention.sh``) decides the kernel configs instead: each candidate of
``SWEEP_ALTERNATIVES`` and the pinned ``CONFIGS`` entry is checked against float64 in worker processes, then timed
kernel by kernel at the anchor mix (head_dim 128 and 256) and at one 8192-token document (head_dim 64, the
Llama-3.2-1B training shape), next to veofast's public op, FlexAttention and torch's varlen_attn; ``--head-dims``
picks some of these shapes, ``--smoke`` runs it on CPU.

    python bench/attention.py [--quick] [--repeats 20] [--shapes uniform-8192,dense-d64] [--providers veofast,flex]
    python bench/attention.py --sweep [--budget-s 190] [--workers 12] [--head-dims 64,128] [--smoke]
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import multiprocessing
import os
import random
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

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
        ("dense-d64", [8192], 32, 8, 64),
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
    group = q.shape[1] // k.shape[1]

    def run(q, k, v):
        # K/V heads repeated inside the timed call: SDPA's flash path does not take enable_gqa.
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        outs = [
            F.scaled_dot_product_attention(
                q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1), is_causal=True
            ).transpose(0, 1)
            for a, b in zip(bounds[:-1], bounds[1:], strict=True)
        ]
        return torch.cat(outs)

    return run


def make_sdpa_cudnn(q, k, v, lengths, cu):
    """cuDNN SDPA over a (documents, heads, length, dim) batch of equal-length documents; the output goes back to
    (tokens, heads, dim) inside the timed call, as a caller of a packed layout would need it."""
    docs, length = len(lengths), lengths[0]

    def batch(t):  # (T, H, D) -> strided (docs, H, length, D) view
        return t.view(docs, length, t.shape[1], t.shape[2]).transpose(1, 2)

    def run(q, k, v):
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            out = F.scaled_dot_product_attention(batch(q), batch(k), batch(v), is_causal=True, enable_gqa=True)
        return out.transpose(1, 2).reshape(q.shape)

    return run


PROVIDERS = {
    "veofast": make_veofast,
    "torch_varlen": make_torch_varlen,
    "flex": make_flex,
    "sdpa_loop": make_sdpa_loop,
    "sdpa_cudnn": make_sdpa_cudnn,
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


def applies(provider: str, name: str, lengths: list[int]) -> bool:
    """The reference runs at the small shape only; cuDNN's batch needs documents of one length."""
    if provider == "reference":
        return name.startswith("small")
    return provider != "sdpa_cudnn" or len(set(lengths)) == 1


def bench_shape(name, lengths, hq, hk, d, repeats, rows, providers=tuple(PROVIDERS)):
    total = sum(lengths)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (torch.randn(total, h, d, device="cuda", dtype=DTYPE, generator=gen) for h in (hq, hk, hk, hq))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    fwd_flops = 4 * d * hq * sum(n * (n + 1) // 2 for n in lengths)
    outputs = {}
    for provider, make in PROVIDERS.items():
        if provider not in providers or not applies(provider, name, lengths):
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


# ---------------------------------------------------------------------------------- config sweep (the GPU job)
# Alternatives to the kernels/attention.py CONFIGS entry of each (kernel, head dim), 16-bit inputs. The entry itself
# is always swept first. Shapes: head dim 128 at the anchor mix, head dim 64 as one 8192-token document
# (the Llama-3.2-1B training shape).
SWEEP_ALTERNATIVES = {
    ("fwd", 64): [(64, 64, 4, 4, True), (64, 64, 4, 2, True), (128, 64, 8, 3, True), (64, 64, 4, 4, True, True, True)],
    ("fwd", 128): [
        (64, 32, 4, 3, True),
        (128, 32, 8, 3, True),
        (64, 64, 4, 2, True),
        (64, 64, 4, 4, True),
        (64, 128, 4, 2, True),
        (128, 64, 8, 3, False),
        (64, 64, 4, 3, True, True, True),  # tile_store (pinned before the V load moved next to K)
    ],
    ("fwd", 256): [(128, 32, 8, 3, False), (128, 32, 8, 3, True), (64, 64, 4, 3, True), (64, 32, 4, 3, True)],
    ("dq", 64): [(128, 64, 8, 3, True), (64, 32, 4, 3, True)],
    ("dq", 128): [(128, 64, 8, 4, True), (128, 64, 8, 3, True), (64, 64, 4, 2, True), (64, 32, 4, 2, True)],
    ("dq", 256): [(64, 32, 4, 3, False), (128, 32, 8, 2, True), (64, 64, 4, 2, True)],
    # dK/dV: (block_m, block_n, warps, stages, tma, split_mask, tile_store, q_rows)
    ("dkdv", 64): [
        (32, 128, 4, 3, True),
        (32, 128, 4, 2, True),
        (64, 64, 4, 4, True, True, False, True),
        (64, 64, 4, 3, True, True, True, True),  # tile_store
        (128, 128, 8, 2, True, True, False, True),
    ],
    ("dkdv", 128): [
        (64, 64, 4, 2, True),
        (64, 64, 4, 2, True, True, True, True),  # tile_store
        (64, 64, 4, 2, True, False, False, True),
        (64, 64, 4, 3, True, True, False, True),
    ],
    ("dkdv", 256): [
        (32, 64, 8, 2, True),
        (32, 64, 8, 3, True),
        (64, 32, 4, 2, True, True, False, True),
        (128, 32, 8, 2, True, True, False, True),
    ],
}
KERNELS = ("fwd", "dq", "dkdv")
RAW_FLOPS = {"fwd": 1.0, "dq": 1.5, "dkdv": 2.0}  # matmul work of each kernel, in forward FLOPs


def sweep_setup(smoke: bool) -> dict:
    """What the sweep runs: the real GPU job, or (``smoke``) the same steps on CPU under the Triton interpreter
    with tiny shapes, fp32 and interpreter-sized configs, to check the script itself."""
    if smoke:
        return {
            "device": "cpu",
            "dtype": torch.float32,
            "shapes": {16: ("dense-d16", [48], 4, 2), 32: ("mix-d32", [37, 1, 20], 4, 2)},
            "check": ([1, 17, 0, 33, 13], 4, 2),
            "candidates": {
                (kernel, d): [
                    (16, 16, 4, 1, False),
                    (16, 32, 4, 1, True),
                    (32, 16, 4, 1, True, False),
                    (16, 32, 4, 1, True, True, True),
                ]
                for kernel in KERNELS
                for d in (16, 32)
            },
            "peers": ["torch_varlen"],
            "repeats": 1,
        }
    from veofast.kernels.attention import CONFIGS, Config

    def candidates(kernel, d):  # the CONFIGS entry first, no duplicates
        specs = [dataclasses.astuple(CONFIGS[(kernel, d, 16)])] + [
            dataclasses.astuple(Config(*s)) for s in SWEEP_ALTERNATIVES[kernel, d]
        ]
        return list(dict.fromkeys(specs))

    return {
        "device": "cuda",
        "dtype": DTYPE,
        "shapes": {
            128: ("anchor", anchor_lengths(), 32, 8),
            64: ("dense-d64", [8192], 32, 8),
            256: ("anchor-d256", anchor_lengths(), 32, 8),
        },
        "check": ([1, 17, 97, 0, 128, 129, 1025, 300, 223], 8, 2),  # odd lengths, an empty document; GQA 4
        "candidates": {key: candidates(*key) for key in SWEEP_ALTERNATIVES},
        "peers": ["torch_varlen", "flex"],
        "repeats": 20,
    }


def _config(spec: tuple):
    from veofast.kernels.attention import Config

    return Config(*spec)


def _random_inputs(lengths, hq, hk, d, dtype, device, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    total = sum(lengths)
    q, k, v, dout = (torch.randn(total, h, d, generator=gen) for h in (hq, hk, hk, hq))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v, dout)], cu


def _kernel_call(kernel: str, config, q, k, v, dout, cu, max_len, prior: dict):
    """A no-argument call of one veofast kernel launcher with ``config``; ``prior`` holds the out/lse/delta that the
    backward kernels read (from the table's configs)."""
    from veofast.kernels import attention as ka

    kw = dict(softmax_scale=q.shape[-1] ** -0.5, window_left=-1, window_right=0, config=config)
    if kernel == "fwd":
        return lambda: ka.varlen_attention_fwd(q, k, v, cu, cu, max_len, max_len, **kw)
    if kernel == "dq":
        return lambda: ka.attention_bwd_dq(dout, q, k, v, prior["out"], prior["lse"], cu, cu, max_len, **kw)
    return lambda: ka.attention_bwd_dkdv(dout, q, k, v, prior["lse"], prior["delta"], cu, cu, max_len, **kw)


def _prior(q, k, v, dout, cu, max_len) -> dict:
    """Forward out/lse and the dQ kernel's delta with the table's configs (what the dQ and dK/dV kernels read)."""
    out, lse = _kernel_call("fwd", None, q, k, v, dout, cu, max_len, {})()
    _, delta = _kernel_call("dq", None, q, k, v, dout, cu, max_len, {"out": out, "lse": lse})()
    return {"out": out, "lse": lse, "delta": delta}


def check_config(kernel: str, head_dim: int, spec: tuple, smoke: bool) -> dict:
    """Pool task: the outputs of ``kernel`` with config ``spec`` against float64 on odd varlen documents (GQA):
    |ours - ref64| <= 2 |torch_same_dtype - ref64| + floor, as in tests/ops/test_attention.py."""
    setup = sweep_setup(smoke)
    result = {"kernel": kernel, "head_dim": head_dim, "config": str(_config(spec)), "ok": False}
    start = time.perf_counter()
    try:
        lengths, hq, hk = setup["check"]
        dtype = setup["dtype"]
        (q, k, v, dout), cu = _random_inputs(lengths, hq, hk, head_dim, dtype, setup["device"], seed=1)
        max_len = max(lengths)

        def reference(*tensors):
            leaves = [t.detach().requires_grad_() for t in tensors[:3]]
            out = varlen_attention_reference(*leaves, cu, cu, max_len, max_len, causal=True)
            grads = torch.autograd.grad(out, leaves, tensors[3])
            return dict(zip(("out", "dq", "dk", "dv"), (out.detach(), *grads), strict=True))

        ref = reference(*(t.double() for t in (q, k, v, dout)))
        low = reference(q, k, v, dout)
        prior = _prior(q, k, v, dout, cu, max_len)
        got = _kernel_call(kernel, _config(spec), q, k, v, dout, cu, max_len, prior)()
        names = {"fwd": ("out", "lse"), "dq": ("dq", "delta"), "dkdv": ("dk", "dv")}[kernel]
        floor = {torch.float32: 2e-5, torch.float16: 1e-3, torch.bfloat16: 4e-3}[dtype]
        errors = {}
        for name, value in zip(names, got, strict=True):
            if name not in ref:
                continue
            err = (value.double() - ref[name]).abs().max().item()
            bound = 2 * (low[name].double() - ref[name]).abs().max().item() + floor * max(1.0, ref[name].abs().max())
            errors[name] = (err, float(bound))
        result["errors"] = {name: f"{err:.2e}<={bound:.2e}" for name, (err, bound) in errors.items()}
        result["ok"] = all(err <= bound for err, bound in errors.values())
    except Exception as exc:  # reported, never fatal: a broken config must not stop the others
        result["error"] = _error_text(exc)
    result["check_s"] = round(time.perf_counter() - start, 1)
    return result


def warm_flex(head_dim: int, smoke: bool) -> str:
    """Pool task: compile FlexAttention fwd+bwd at a sweep shape so that the timing process finds it cached."""
    setup = sweep_setup(smoke)
    name, lengths, hq, hk = setup["shapes"][head_dim]
    start = time.perf_counter()
    try:
        (q, k, v, dout), cu = _random_inputs(lengths, hq, hk, head_dim, setup["dtype"], setup["device"])
        pq, pk, pv, pdout = (to_provider_layout("flex", t) for t in (q, k, v, dout))
        fn = make_flex(q, k, v, lengths, cu)
        with torch.no_grad():  # measure() times an inference call first: a graph of its own
            fn(pq, pk, pv)
        leaves = [t.requires_grad_() for t in (pq, pk, pv)]
        torch.autograd.grad(fn(*leaves), leaves, pdout)
        return f"flex warm {name}: {time.perf_counter() - start:.0f} s"
    except Exception as exc:
        return f"flex warm {name} failed: {_error_text(exc)}"


def _run_checks(setup: dict, smoke: bool, workers: int, deadline: float) -> list[dict]:
    """Every candidate config checked in a pool of fresh processes (one task each, so a crashed CUDA context loses
    one config), FlexAttention compiled alongside; whatever has not finished at ``deadline`` is reported as such."""
    ctx = multiprocessing.get_context("spawn")
    pool = ctx.Pool(workers, maxtasksperchild=1)
    warm = [] if "flex" not in setup["peers"] else [pool.apply_async(warm_flex, (d, smoke)) for d in setup["shapes"]]
    tasks = [
        ((kernel, d, spec), pool.apply_async(check_config, (kernel, d, spec, smoke)))
        for (kernel, d), specs in setup["candidates"].items()
        for spec in specs
    ]
    pool.close()
    pending = [t for _, t in tasks] + warm
    while not all(t.ready() for t in pending) and time.monotonic() < deadline:
        time.sleep(0.5)
    results = []
    for (kernel, d, spec), task in tasks:
        if task.ready():
            results.append(task.get())
        else:
            results.append(
                {
                    "kernel": kernel,
                    "head_dim": d,
                    "config": str(_config(spec)),
                    "ok": False,
                    "error": "check not finished by the deadline",
                }
            )
    for w in warm:
        print(w.get() if w.ready() else "flex warm-up not finished by the deadline", flush=True)
    pool.terminate()
    pool.join()
    return results


def _error_text(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"


def _provider_line(row: dict, note: str = "") -> str:
    if "error" in row:
        return f"  {row['provider']:<20} error {row['error'][:90]}"
    return (
        f"  {row['provider']:<20}{row['fwd_ms']:>9.3f} {row['fwd_tflops']:>5.0f}"
        f"{row['fwdbwd_ms']:>9.3f} {row['fwdbwd_tflops']:>5.0f}{note}"
    )


def _time_configs(kernel, setup, data, prior, checks, deadline, lines, rows) -> tuple | None:
    """Time every config of ``kernel`` that passed its check; returns (spec, ms) of the fastest."""
    from veofast.kernels.attention import default_config

    q, k, v, dout, cu, max_len, flops = (data[key] for key in ("q", "k", "v", "dout", "cu", "max_len", "flops"))
    head_dim = q.shape[-1]
    table = str(default_config(kernel, head_dim, q.dtype))
    cells, best = [], None
    for spec in setup["candidates"][(kernel, head_dim)]:
        name = str(_config(spec))
        check = next(c for c in checks if c["kernel"] == kernel and c["head_dim"] == head_dim and c["config"] == name)
        label = name + ("*" if name == table else "")
        if not check["ok"]:
            cells.append(f"{label} FAIL")
            continue
        if time.monotonic() > deadline:
            cells.append(f"{label} (no time)")
            continue
        row = {**data["base"], "provider": "veofast-kernel", "kernel": kernel, "config": name}
        try:
            call = _kernel_call(kernel, _config(spec), q, k, v, dout, cu, max_len, prior)
            row["ms"] = time_ms(call, warmup=2, repeats=setup["repeats"])
            row["raw_tflops"] = RAW_FLOPS[kernel] * flops / row["ms"] / 1e9
            cells.append(f"{label} {row['ms']:.3f}ms {row['raw_tflops']:.0f}")
            if best is None or row["ms"] < best[1]:
                best = (spec, row["ms"])
        except Exception as exc:
            row["error"] = _error_text(exc)
            cells.append(f"{label} error {row['error'][:60]}")
        rows.append(record(SUITE, row))
    lines.append(f"  {kernel:<5}" + " | ".join(cells))
    return best


def _time_best(best: dict, setup, data, rows) -> dict:
    """fwd+bwd through the launchers with the fastest config of each kernel (what pinning them would give)."""
    q, k, v, dout, cu, max_len, flops = (data[key] for key in ("q", "k", "v", "dout", "cu", "max_len", "flops"))
    configs = {kernel: _config(spec) for kernel, (spec, _) in best.items()}

    def fwd_bwd():
        out, lse = _kernel_call("fwd", configs["fwd"], q, k, v, dout, cu, max_len, {})()
        prior = {"out": out, "lse": lse}
        _, prior["delta"] = _kernel_call("dq", configs["dq"], q, k, v, dout, cu, max_len, prior)()
        return _kernel_call("dkdv", configs["dkdv"], q, k, v, dout, cu, max_len, prior)()

    row = {**data["base"], "provider": "veofast-best", "configs": {kernel: str(c) for kernel, c in configs.items()}}
    row["fwd_ms"] = best["fwd"][1]
    row["fwdbwd_ms"] = time_ms(fwd_bwd, warmup=2, repeats=setup["repeats"])
    row["fwd_tflops"] = flops / row["fwd_ms"] / 1e9
    row["fwdbwd_tflops"] = 3.5 * flops / row["fwdbwd_ms"] / 1e9
    rows.append(record(SUITE, row))
    return row


def _shape_data(setup: dict, head_dim: int) -> dict:
    """Inputs (seeded, so equal on every call), FLOPs and record fields of the sweep shape of ``head_dim``."""
    name, lengths, hq, hk = setup["shapes"][head_dim]
    (q, k, v, dout), cu = _random_inputs(lengths, hq, hk, head_dim, setup["dtype"], setup["device"])
    flops = 4 * head_dim * hq * sum(n * (n + 1) // 2 for n in lengths)
    base = {"shape": name, "tokens": sum(lengths), "docs": len(lengths), "q_heads": hq, "kv_heads": hk}
    base.update(head_dim=head_dim, dtype=str(setup["dtype"]).removeprefix("torch."), sweep=True)
    return dict(q=q, k=k, v=v, dout=dout, cu=cu, lengths=lengths, max_len=max(lengths), flops=flops, base=base)


def _time_providers(setup, data, providers, deadline, lines, rows) -> None:
    """fwd and fwd+bwd of whole providers ("veofast" = the public op with the pinned configs)."""
    q, k, v, dout = data["q"], data["k"], data["v"], data["dout"]
    for provider in providers:
        row = {**data["base"], "provider": provider if provider != "veofast" else "veofast-table"}
        if time.monotonic() > deadline:
            lines.append(f"  {row['provider']:<20} skipped, out of time")
            continue
        try:
            pq, pk, pv, pdout = (to_provider_layout(provider, t) for t in (q, k, v, dout))
            fn = PROVIDERS[provider](q, k, v, data["lengths"], data["cu"])
            measure(fn, pq, pk, pv, pdout, data["flops"], setup["repeats"], row)
        except Exception as exc:
            row["error"] = _error_text(exc)
        lines.append(_provider_line(row))
        rows.append(record(SUITE, row))


def _time_kernels(setup, data, checks, deadline, lines, rows) -> None:
    """Every checked config of each kernel, then the fastest ones together, and the CONFIGS lines to pin them."""
    head_dim = data["q"].shape[-1]
    prior = _prior(*(data[key] for key in ("q", "k", "v", "dout", "cu", "max_len")))
    best = {kernel: _time_configs(kernel, setup, data, prior, checks, deadline, lines, rows) for kernel in KERNELS}
    if not all(best.values()) or time.monotonic() > deadline:
        return
    lines.append(_provider_line(_time_best(best, setup, data, rows), "  (launchers, best configs)"))
    for kernel, (spec, _) in best.items():
        c = _config(spec)
        flags = f", tma={c.tma}" + ("" if c.split_mask or kernel != "dkdv" else ", split_mask=False")
        flags += ", tile_store=True" if c.tile_store else ""
        flags += ", q_rows=True" if c.q_rows else ""
        lines.append(
            f'  pin ("{kernel}", {head_dim}, 16): Config({c.block_m}, {c.block_n}, {c.num_warps}, '
            f"{c.num_stages}{flags}),"
        )


def sweep(smoke: bool, budget_s: float, workers: int, head_dims: list[int] | None = None) -> None:
    """The GPU job: check every candidate config, then time the table, torch's varlen_attn and the configs per
    shape, FlexAttention last (its compilation must not starve the sweep); print a summary. ``head_dims``: the
    sweep shapes to run (default all)."""
    start = time.monotonic()
    deadline = start + budget_s
    setup = sweep_setup(smoke)
    if head_dims:
        unknown = sorted(set(head_dims) - set(setup["shapes"]))
        if unknown:
            raise SystemExit(f"--head-dims: no sweep shape for {unknown}; choose from {sorted(setup['shapes'])}")
        setup["shapes"] = {d: shape for d, shape in setup["shapes"].items() if d in head_dims}
        setup["candidates"] = {key: specs for key, specs in setup["candidates"].items() if key[1] in head_dims}
    checks = _run_checks(setup, smoke, workers, start + budget_s * 0.5)
    for check in checks:
        record(SUITE, {"check": "config_vs_float64", **check})
        print(
            f"check {check['kernel']:<5} d{check['head_dim']:<4} {check['config']:<26} "
            f"{'ok' if check['ok'] else 'FAIL'} {check.get('errors', '')} {check.get('error', '')} "
            f"({check['check_s'] if 'check_s' in check else '-'} s)",
            flush=True,
        )
    print(f"checks done at {time.monotonic() - start:.0f} s", flush=True)
    blocks, rows = {}, []
    for head_dim, (name, lengths, hq, hk) in setup["shapes"].items():
        data = _shape_data(setup, head_dim)
        lines = blocks[head_dim] = [
            f"[{name}] {sum(lengths)} tok, {len(lengths)} docs, {hq}/{hk} heads, d{head_dim}, F={data['flops']:.2e}",
            f"  {'provider':<20}{'fwd ms':>9} {'TF/s':>5}{'f+b ms':>9} {'TF/s':>5}",
        ]
        _time_providers(setup, data, ["veofast", *(p for p in setup["peers"] if p != "flex")], deadline, lines, rows)
        _time_kernels(setup, data, checks, deadline, lines, rows)
        print("\n".join(lines), flush=True)
    if "flex" in setup["peers"]:
        for head_dim in setup["shapes"]:
            _time_providers(setup, _shape_data(setup, head_dim), ["flex"], deadline, blocks[head_dim], rows)
    failed = [
        f"{c['kernel']} d{c['head_dim']} {c['config']}: {c.get('error') or c.get('errors')}"
        for c in checks
        if not c["ok"]
    ]
    print(
        f"\n=== attention sweep summary ({time.monotonic() - start:.0f} s; * = CONFIGS entry; kernel cells: "
        "ms and raw TFLOP/s of the matmuls each kernel runs: fwd 1x, dq 1.5x, dkdv 2x the forward's)"
    )
    print("\n".join(line for lines in blocks.values() for line in lines))
    print(f"failed checks: {len(failed)}" + "".join(f"\n  {f[:140]}" for f in failed[:6]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the anchor and the small mix only")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--shapes", help="comma-separated shape names (default: all of the run)")
    parser.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma-separated subset of {list(PROVIDERS)}")
    parser.add_argument("--sweep", action="store_true", help="the GPU job: check and time every candidate config")
    parser.add_argument("--smoke", action="store_true", help="with --sweep: tiny shapes on CPU (Triton interpreter)")
    parser.add_argument("--budget-s", type=float, default=190.0, help="with --sweep: stop starting work after this")
    parser.add_argument("--workers", type=int, default=12, help="with --sweep: processes that check configs")
    parser.add_argument("--head-dims", help="with --sweep: comma-separated head dims of the sweep shapes to run")
    args = parser.parse_args()
    if args.sweep:
        if args.smoke:
            os.environ["TRITON_INTERPRET"] = "1"  # before any triton import, here and in the spawned workers
        head_dims = [int(d) for d in args.head_dims.split(",")] if args.head_dims else None
        sweep(args.smoke, args.budget_s, args.workers, head_dims)
        return
    if not torch.cuda.is_available():
        sys.exit("bench/attention.py needs a CUDA GPU")
    plan = shapes(args.quick and not args.shapes)
    names, providers = [row[0] for row in plan], args.providers.split(",")
    chosen = args.shapes.split(",") if args.shapes else names
    for flag, given, allowed in (("shapes", chosen, names), ("providers", providers, list(PROVIDERS))):
        if set(given) - set(allowed):
            parser.error(f"--{flag}: unknown {sorted(set(given) - set(allowed))}; choose from {allowed}")
    rows: list[dict] = []
    for name, lengths, hq, hk, d in [row for row in plan if row[0] in chosen]:
        print(f"--- {name}: {len(lengths)} docs, {sum(lengths)} tokens, heads {hq}/{hk}, head_dim {d}", flush=True)
        bench_shape(name, lengths, hq, hk, d, args.repeats, rows, providers)
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
