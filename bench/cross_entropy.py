"""Benchmark of the fused linear cross-entropy: forward + backward, bf16, 10% of labels ignored (``--ignored``), mean
loss.

Providers side by side in one process: veofast (Triton, and the torch reference), torch eager
(``x @ W.T`` -> float -> ``F.cross_entropy``), torch.compile of eager, and, when importable, liger-kernel's
``LigerFusedLinearCrossEntropyLoss`` and cut-cross-entropy's ``linear_cross_entropy``. veofast also runs with the
host's count of kept labels (``num_label_tokens``, which the collators give the training loop; counted outside the
timing): the ignored tokens are then left out of the matmuls (``tflops`` and ``pct_floor`` still count the matmuls of
all N tokens, so that row can pass 100%). At the anchor shape veofast also runs with several
fixed logits-chunk budgets besides the default (``kernels.cross_entropy.default_chunk_bytes``: 256 MiB there), and
the bench times what the matmuls alone take on this GPU (``gemm_bound``): the three cuBLAS GEMMs of the kept tokens
back to back with no softmax work, chunked as veofast's pass chunks them and unchunked (all logits in memory).

Extra peak memory = peak allocated during fwd+bwd minus what existed before (inputs, weight) minus the gradients of
hidden and weight that the step leaves behind: the ANCHORS.md convention ("above the steady state where inputs,
weight and their grads exist").

    python bench/cross_entropy.py [--quick] [--repeats 10] [--tokens 4096 65536] [--ignored 0.5]
"""

from __future__ import annotations

import argparse
import functools
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import H200_BF16_TFLOPS, peak_extra_gib, print_table, record, time_ms  # noqa: E402
from veofast.ops.cross_entropy import fused_linear_cross_entropy  # noqa: E402

SUITE = "cross_entropy"
H = 4096
ANCHOR = (16384, H, 151936)
# The anchor, the token counts around it, and every vocabulary at the anchor's N and at the small N (where chunked
# kernels lose the most).
VOCABS = (32000, 128256, 151936, 262144)
SHAPES = [ANCHOR, (65536, H, 151936), *((n, H, v) for n in (16384, 4096) for v in VOCABS if (n, H, v) != ANCHOR)]
CHUNK_SWEEP_MIB = (128, 512, 1024, 2048)  # the default, 256 MiB, is the plain veofast-triton row


def eager(h, w, y):
    return F.cross_entropy((h @ w.t()).float(), y)


def providers() -> dict:
    """name -> loss function (h, w, y) -> 0-dim loss; peers that do not import are skipped with a note."""
    found = {
        "veofast-triton": lambda h, w, y: fused_linear_cross_entropy(h, w, y, backend="triton"),
        "veofast-torch": lambda h, w, y: fused_linear_cross_entropy(h, w, y, backend="torch"),
        "torch-eager": eager,
        "torch-compile": torch.compile(eager),
    }
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss(ignore_index=-100)
        found["liger"] = lambda h, w, y: liger(w, h, y)
    except Exception as exc:  # ImportError or a broken install
        print(f"note: liger-kernel skipped ({type(exc).__name__}: {exc})")
    try:
        from cut_cross_entropy import linear_cross_entropy

        found["cut-cross-entropy"] = lambda h, w, y: linear_cross_entropy(h, w, y, ignore_index=-100)
    except Exception as exc:
        print(f"note: cut-cross-entropy skipped ({type(exc).__name__}: {exc})")
    return found


def make_inputs(n: int, h: int, v: int, *, ignored: float = 0.1, seed: int = 0):
    """bf16 hidden (n, h) ~ N(0, 1), weight (v, h) ~ N(0, 0.02^2), both leaves; labels (n,), each ignored (-100) with
    probability ``ignored``."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(n, h, device="cuda", generator=gen, dtype=torch.bfloat16).requires_grad_()
    weight = (torch.randn(v, h, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.02).requires_grad_()
    labels = torch.randint(0, v, (n,), device="cuda", generator=gen)
    labels[torch.rand(n, device="cuda", generator=gen) < ignored] = -100
    return hidden, weight, labels


def measure(name: str, fn, hidden, weight, labels, repeats: int, ignored: float) -> dict:
    """Median fwd+bwd time and extra peak memory of one provider; an OOM or error is recorded, not raised.
    ``ignored``: the share of ignored labels asked of ``make_inputs`` (the row also has the share drawn)."""
    n, h = hidden.shape
    v = weight.shape[0]
    drawn = round((labels == -100).sum().item() / n, 3)
    row = {"provider": name, "N": n, "H": h, "V": v, "dtype": "bfloat16", "ignored": ignored, "ignored_drawn": drawn}

    def step():
        hidden.grad = weight.grad = None
        fn(hidden, weight, labels).backward()

    try:
        ms = time_ms(step, warmup=3, repeats=repeats)
        hidden.grad = weight.grad = None
        grads_gib = (hidden.numel() + weight.numel()) * hidden.element_size() / 2**30
        row["extra_peak_gib"] = peak_extra_gib(step) - grads_gib
        floor_ms = 6 * n * h * v / (H200_BF16_TFLOPS * 1e12) * 1e3
        row.update(ms=ms, tflops=6 * n * h * v / ms / 1e9, pct_floor=100 * floor_ms / ms)
    except torch.cuda.OutOfMemoryError:
        row["error"] = "OOM"
        print(f"note: {name} at N={n} V={v}: out of memory")
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        print(f"note: {name} at N={n} V={v} failed:\n{traceback.format_exc()}")
    hidden.grad = weight.grad = None
    torch.cuda.empty_cache()
    return record(SUITE, row)


def loss_gemms(x, w, logits, grad_hidden, grad_weight) -> None:
    """The three GEMMs of a linear cross-entropy over ``x (n, H)`` and ``w (V, H)``, in chunks of
    ``logits.shape[0]`` rows: ``logits = x @ w.T``, ``grad_hidden = logits @ w``, ``grad_weight += logits.T @ x``
    (the logits stand in for their gradient; no softmax work)."""
    rows = logits.shape[0]
    for start in range(0, x.shape[0], rows):
        chunk = x[start : start + rows]
        part = logits[: chunk.shape[0]]
        torch.mm(chunk, w.t(), out=part)
        torch.mm(part, w, out=grad_hidden[start : start + rows])
        if start == 0:
            torch.mm(part.t(), chunk, out=grad_weight)
        else:
            grad_weight.addmm_(part.t(), chunk)


def gemm_bound(hidden, weight, labels, repeats: int, ignored: float) -> list[dict]:
    """Time of ``loss_gemms`` for the tokens whose label is kept, chunked as veofast's pass chunks them with the label
    count, and in one chunk (all logits in memory). Under sustained load the GPU runs at its power limit, so this,
    not the isolated GEMM rate, bounds what any provider can reach."""
    import veofast.kernels.cross_entropy as kernels

    n, h = hidden.shape
    v = weight.shape[0]
    x, w = hidden.detach()[labels != -100], weight.detach()
    kept, elem = x.shape[0], x.element_size()
    budget = kernels.default_chunk_bytes(kept, h, elem)
    chunked = kernels.chunk_rows(kept, v, elem, budget_bytes=budget, whole_up_to=h)
    grad_hidden, grad_weight = torch.empty_like(x), torch.empty_like(w)
    floor_ms = 6 * n * h * v / (H200_BF16_TFLOPS * 1e12) * 1e3
    out = []
    for rows in dict.fromkeys((chunked, kept)):
        logits = torch.empty(rows, v, dtype=x.dtype, device=x.device)
        ms = time_ms(functools.partial(loss_gemms, x, w, logits, grad_hidden, grad_weight), warmup=3, repeats=repeats)
        row = {"provider": f"bound: GEMMs alone[kept rows, chunks of {rows}]", "N": n, "H": h, "V": v}
        row.update(dtype="bfloat16", ignored=ignored, kept=kept, chunk_rows=rows, ms=ms)
        row.update(tflops=6 * n * h * v / ms / 1e9, pct_floor=100 * floor_ms / ms)
        out.append(record(SUITE, row))
        del logits
    del x, grad_hidden, grad_weight
    torch.cuda.empty_cache()
    return out


def correctness(hidden, weight, labels) -> None:
    """Loss and gradients of veofast and of torch's bf16 path, each against torch in fp32, at one shape."""

    def loss_and_grads(fn, h, w):
        h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        loss = fn(h, w, labels)
        loss.backward()
        return loss.detach().double(), h.grad.double(), w.grad.double()

    ref = loss_and_grads(lambda h, w, y: F.cross_entropy(h @ w.t(), y), hidden.float(), weight.float())
    for name, fn in [("veofast-triton", lambda h, w, y: fused_linear_cross_entropy(h, w, y)), ("torch-bf16", eager)]:
        got = loss_and_grads(fn, hidden, weight)
        errs = [((g - r).norm() / r.norm()).item() for g, r in zip(got, ref, strict=True)]
        del got
        print(
            f"correctness {name} vs torch fp32: loss rel err {errs[0]:.2e}, grad_hidden rel err {errs[1]:.2e}, "
            f"grad_weight rel err {errs[2]:.2e}"
        )
        record(
            SUITE,
            {
                "provider": name,
                "check": "rel_err_vs_fp32",
                "N": hidden.shape[0],
                "V": weight.shape[0],
                "loss_rel_err": errs[0],
                "grad_hidden_rel_err": errs[1],
                "grad_weight_rel_err": errs[2],
            },
        )
    del ref
    torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only the anchor shape")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--tokens", type=int, nargs="*", help="only the shapes with these token counts N")
    parser.add_argument("--ignored", type=float, default=0.1, help="share of ignored labels (SFT masks prompts)")
    args = parser.parse_args()
    if not 0.0 <= args.ignored < 1.0:
        raise SystemExit(f"--ignored must be in [0, 1), got {args.ignored}")
    if not torch.cuda.is_available():
        raise SystemExit("bench/cross_entropy.py needs a CUDA GPU")
    import veofast.kernels.cross_entropy as kernels

    rows = []
    found = providers()
    shapes = [ANCHOR] if args.quick else [s for s in SHAPES if not args.tokens or s[0] in args.tokens]
    if not shapes:
        raise SystemExit(f"--tokens {args.tokens}: no shape has these token counts; shapes: {SHAPES}")
    for n, h, v in shapes:
        hidden, weight, labels = make_inputs(n, h, v, ignored=args.ignored)
        if (n, h, v) == ANCHOR:
            correctness(hidden, weight, labels)
        for name, fn in found.items():
            rows.append(measure(name, fn, hidden, weight, labels, args.repeats, args.ignored))
        count = int((labels != -100).sum())
        counted = functools.partial(fused_linear_cross_entropy, backend="triton", num_label_tokens=count)
        rows.append(measure("veofast-triton[label count]", counted, hidden, weight, labels, args.repeats, args.ignored))
        if (n, h, v) == ANCHOR:
            default = kernels.DEFAULT_CHUNK_BYTES, kernels.MAX_CHUNK_BYTES
            for mib in CHUNK_SWEEP_MIB:
                kernels.DEFAULT_CHUNK_BYTES = kernels.MAX_CHUNK_BYTES = mib * 2**20
                rows.append(
                    measure(
                        f"veofast-triton[chunk {mib}MiB]",
                        found["veofast-triton"],
                        hidden,
                        weight,
                        labels,
                        args.repeats,
                        args.ignored,
                    )
                )
            kernels.DEFAULT_CHUNK_BYTES, kernels.MAX_CHUNK_BYTES = default
            rows.extend(gemm_bound(hidden, weight, labels, args.repeats, args.ignored))
        del hidden, weight, labels
        torch.cuda.empty_cache()
    print(
        f"\nfused linear cross-entropy, fwd+bwd, bf16, {args.ignored:.0%} of labels ignored, "
        f"{torch.cuda.get_device_name()}; default chunk "
        f"{kernels.DEFAULT_CHUNK_BYTES // 2**20} MiB, up to {kernels.MAX_CHUNK_BYTES // 2**20} MiB with more tokens; "
        f"floor = 6NHV at {H200_BF16_TFLOPS} TFLOP/s"
    )
    print_table(rows, ["provider", "N", "H", "V", "ms", "tflops", "pct_floor", "extra_peak_gib", "error"])


if __name__ == "__main__":
    main()
