"""Throughput of the decoder's small fused ops: RMSNorm (plain and with the residual add), RoPE and SwiGLU.

Providers, side by side in one process: veofast's Triton kernels, torch eager written the way HF writes the op
(RoPE with cos/sin precomputed once, as HF shares them across layers), ``torch.compile`` of the same, and
liger-kernel (``LigerRMSNorm``, ``LigerFusedAddRMSNorm``, ``liger_rotary_pos_emb``, ``LigerSiLUMulFunction``) when it
imports. GB/s counts the bytes that a fused kernel must read and write (the same count for every provider, so a
provider that moves more, e.g. cos/sin tensors, shows as slower); ``%copy`` is that against the 4.21 TB/s
device-to-device copy ceiling of an H200. ``err`` is the forward's largest difference from veofast's reference.

    python bench/small_ops.py [--quick] [--ops rms_norm,rope,swiglu] [--providers veofast,torch,...]
"""

import argparse
import sys
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
EPS = 1e-6


@dataclass
class Case:
    """One op at one shape: differentiable inputs, a callable per provider, and the bytes a fused kernel moves."""

    op: str
    shape: str
    inputs: list[torch.Tensor]
    providers: dict[str, Callable]
    reference: Callable
    bytes_fwd: int
    bytes_bwd: int


def _randn(*shape, dtype=torch.bfloat16):
    return torch.randn(*shape, device="cuda", dtype=dtype)


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
        print(f"note: liger-kernel {name} skipped ({type(exc).__name__}: {exc})")
        return None
    return obj


def rms_norm_case(n_rows: int, hidden: int, with_residual: bool) -> Case:
    x, residual, weight = _randn(n_rows, hidden), _randn(n_rows, hidden), 1 + 0.1 * _randn(hidden)
    s = x.element_size()
    tensors = n_rows * hidden * s
    if with_residual:
        inputs = [x, residual, weight]
        reference = lambda x, r, w: rms_norm_reference(x, w, EPS, residual=r)
        providers = {"veofast": lambda x, r, w: rms_norm(x, w, EPS, residual=r, backend="triton"), "torch": reference}
        liger_cls = _liger("add_rms_norm")
        # fwd: x, residual in; y, h out. bwd: dy, dh, h in; dx (= dresidual) out.
        bytes_fwd, bytes_bwd = 4 * tensors, 4 * tensors
    else:
        inputs = [x, weight]
        reference = lambda x, w: rms_norm_reference(x, w, EPS)
        providers = {"veofast": lambda x, w: rms_norm(x, w, EPS, backend="triton"), "torch": reference}
        liger_cls = _liger("rms_norm")
        bytes_fwd, bytes_bwd = 2 * tensors, 3 * tensors  # fwd: x in, y out; bwd: dy, x in, dx out
    bytes_fwd += hidden * s
    bytes_bwd += 2 * hidden * s  # weight in, dweight out
    providers["torch.compile"] = torch.compile(reference, dynamic=False)
    if liger_cls is not None:
        module = liger_cls(hidden, eps=EPS).to(device="cuda", dtype=x.dtype)
        if with_residual:
            providers["liger"] = lambda x, r, w: torch.func.functional_call(module, {"weight": w}, (x, r))
        else:
            providers["liger"] = lambda x, w: torch.func.functional_call(module, {"weight": w}, (x,))
    name = "rms_norm+residual" if with_residual else "rms_norm"
    return Case(name, f"{n_rows}x{hidden}", inputs, providers, reference, bytes_fwd, bytes_bwd)


def rope_case(n_tokens: int, n_q: int, n_k: int, head_dim: int) -> Case:
    q, k = _randn(n_tokens, n_q, head_dim), _randn(n_tokens, n_k, head_dim)
    lengths = torch.randint(64, 4096, (n_tokens // 64,))
    position_ids = torch.cat([torch.arange(int(n)) for n in lengths])[:n_tokens].cuda()
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2, device="cuda", dtype=torch.float32) / head_dim)
    freqs = position_ids.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(q.dtype), emb.sin().to(q.dtype)  # (T, D), computed once per step as in HF

    def hf_rope(q, k):
        def rot(x):
            half = x.shape[-1] // 2
            return x * cos[:, None] + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin[:, None]

        return rot(q), rot(k)

    providers = {
        "veofast": lambda q, k: apply_rotary(q, k, position_ids, inv_freq, backend="triton"),
        "torch": hf_rope,
        "torch.compile": torch.compile(hf_rope, dynamic=False),
    }
    liger_rope = _liger("rope")
    if liger_rope is not None:

        def liger(q, k):  # liger wants (1, H, T, D) views of (1, T, H, D) storage and (1, T, D) cos/sin
            q_out, k_out = liger_rope(q[None].transpose(1, 2), k[None].transpose(1, 2), cos[None], sin[None])
            return q_out.transpose(1, 2)[0], k_out.transpose(1, 2)[0]

        providers["liger"] = liger
    reference = lambda q, k: apply_rotary_reference(q, k, position_ids, inv_freq)
    moved = 2 * (q.numel() + k.numel()) * q.element_size()
    bytes_fwd = moved + position_ids.numel() * position_ids.element_size() + inv_freq.numel() * 4
    return Case("rope", f"T{n_tokens} {n_q}/{n_k}h d{head_dim}", [q, k], providers, reference, bytes_fwd, bytes_fwd)


def swiglu_case(n_rows: int, inter: int) -> Case:
    gate, up = _randn(n_rows, inter), _randn(n_rows, inter)

    def hf_swiglu(gate, up):
        return F.silu(gate) * up

    providers = {
        "veofast": lambda g, u: swiglu(g, u, backend="triton"),
        "torch": hf_swiglu,
        "torch.compile": torch.compile(hf_swiglu, dynamic=False),
    }
    liger_fn = _liger("swiglu")
    if liger_fn is not None:
        providers["liger"] = lambda g, u: liger_fn.apply(g, u)
    tensor = gate.numel() * gate.element_size()
    # fwd: gate, up in, y out; bwd: dy, gate, up in, dgate, dup out
    return Case("swiglu", f"{n_rows}x{inter}", [gate, up], providers, swiglu_reference, 3 * tensor, 5 * tensor)


def _as_tuple(out) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def run_case(case: Case, providers: list[str], warmup: int, repeats: int) -> list[dict]:
    rows = []
    with torch.no_grad():
        expected = _as_tuple(case.reference(*case.inputs))
    grad_outputs = [torch.randn_like(o) for o in expected]
    leaves = [t.detach().requires_grad_() for t in case.inputs]
    dtype = str(case.inputs[0].dtype).removeprefix("torch.")
    # In PROVIDERS order, liger last: its kernels write into their inputs and grad_outputs.
    for name in [p for p in PROVIDERS if p in providers and p in case.providers]:
        fn = case.providers[name]
        base = {"op": case.op, "shape": case.shape, "dtype": dtype, "provider": name}
        try:
            with torch.no_grad():  # on clones: some providers (liger) write into their inputs
                got = _as_tuple(fn(*[t.clone() for t in case.inputs]))
            err = max((g.float() - e.float()).abs().max().item() for g, e in zip(got, expected, strict=True))

            def fwd(fn=fn):
                with torch.no_grad():
                    fn(*case.inputs)

            def fwd_bwd(fn=fn):
                outs = _as_tuple(fn(*leaves))
                torch.autograd.grad(outs, leaves, grad_outputs)

            modes = [("fwd", fwd, case.bytes_fwd), ("fwd+bwd", fwd_bwd, case.bytes_fwd + case.bytes_bwd)]
            for mode, step, n_bytes in modes:
                ms = time_ms(step, warmup=warmup, repeats=repeats)
                gbps = n_bytes / ms / 1e6
                row = {**base, "mode": mode, "ms": ms, "GB/s": gbps, "%copy": 100 * gbps / (H200_COPY_TBPS * 1e3)}
                row |= {"err": err, "peak_gib": peak_extra_gib(step) if mode == "fwd+bwd" else None}
                rows.append(row)
                record("small_ops", row)
        except Exception as exc:  # a provider that fails is reported, and the others still run
            message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
            rows.append({**base, "mode": "-", "error": message})
            record("small_ops", {**base, "error": message})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="headline shapes only, fewer timed runs")
    parser.add_argument("--ops", default="rms_norm,rope,swiglu", help="comma-separated subset of rms_norm,rope,swiglu")
    parser.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma-separated subset of {PROVIDERS}")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/small_ops.py needs a CUDA GPU")
    providers = args.providers.split(",")
    unknown = set(providers) - set(PROVIDERS)
    if unknown:
        parser.error(f"--providers: unknown {sorted(unknown)}; choose from {PROVIDERS}")
    ops = args.ops.split(",")
    warmup, repeats = (3, 10) if args.quick else (10, 50)
    torch.manual_seed(0)

    # (op, builder, arguments, in --quick)
    plan = [
        ("rms_norm", rms_norm_case, (16384, 4096, True), True),
        ("rms_norm", rms_norm_case, (16384, 4096, False), False),
        ("rms_norm", rms_norm_case, (16384, 2048, True), False),
        ("rope", rope_case, (16384, 32, 8, 128), True),
        ("rope", rope_case, (16384, 32, 8, 64), False),
        ("swiglu", swiglu_case, (16384, 8192), True),
        ("swiglu", swiglu_case, (131072, 768), True),
    ]

    rows = []
    for op, build, build_args, in_quick in plan:
        if op in ops and (in_quick or not args.quick):
            rows += run_case(build(*build_args), providers, warmup, repeats)
            torch.cuda.empty_cache()
    print(
        f"\n{torch.cuda.get_device_name()}: GB/s of the bytes a fused kernel moves; copy ceiling {H200_COPY_TBPS} TB/s"
    )
    print_table(rows, ["op", "shape", "dtype", "mode", "provider", "ms", "GB/s", "%copy", "err", "peak_gib", "error"])
    for row in rows:
        if "error" in row:
            print(f"failed: {row['op']} {row['shape']} {row['provider']}: {row['error']}")


if __name__ == "__main__":
    main()
