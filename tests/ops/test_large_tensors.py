"""Tensors of more than 2**31 elements: the kernels' address arithmetic must not wrap in int32.

Triton passes integer arguments below 2**31 as int32 and ``tl.program_id`` / ``tl.arange`` are int32, so an offset
such as ``row * stride`` or ``head * head_stride`` computed from them wraps once it passes 2**31 - 1, even when every
argument fits. Each GPU test makes one call just past that limit (bf16, the smallest shapes that cross it) and
compares elements whose offsets are past 2**31 (at the end of the tensor, plus a few at the start) against the torch
reference computed on those elements alone: |fast - ref64| <= k |torch in bf16 - ref64| + floor, in the max norm,
as the other GPU tests of tests/ops do.

- Tests named ``..._wrapped_...`` exercise offsets that were int32 before the int64 fixes of this file's commit
  (their docstrings say which); they were not run against the old kernels. A wrapped offset points up to 4 GiB
  before the tensor, so on old code they may also fail with an illegal memory access, which spoils the CUDA context
  for the tests after them.
- The other GPU tests guard offsets that were already int64 (the realistic large shapes: MoE rows, attention with
  many tokens, (T, H) activations, a 2.1e9-element optimizer tensor).
- The unmarked tests check the ValueErrors of the limits that remain (int32 slot and row indices), on views that
  take no memory.

Peak memory is given per test (about 4.3 GB per 2**31 bf16 elements); each frees what it allocated (the fixture
below also empties the CUDA cache) and is skipped when the GPU has not that much free.
"""

from __future__ import annotations

import gc
import sys

import pytest
import torch

LIMIT = 2**31
DEVICE = "cuda"
BF16 = torch.bfloat16


@pytest.fixture(autouse=True)
def _free_gpu_memory():
    """After each test: drop what a failed test's traceback keeps alive, and give the memory back."""
    yield
    for name in ("last_type", "last_value", "last_traceback", "last_exc"):
        if hasattr(sys, name):
            setattr(sys, name, None)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _need_gib(gib: float) -> None:
    free, _ = torch.cuda.mem_get_info()
    if free < gib * 2**30:
        pytest.skip(f"needs {gib} GiB of free GPU memory, {free / 2**30:.1f} GiB free")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


def _randn(*shape, gen, dtype=BF16) -> torch.Tensor:
    return torch.randn(shape, generator=gen, device=DEVICE, dtype=dtype)


def _assert_bound(name, fast, low, ref64, floor, k=2.0):
    """|fast - ref64| <= k |low - ref64| + floor * max(1, |ref64|), in the max norm (NaN fails)."""
    assert fast.shape == ref64.shape, f"{name}: shape {tuple(fast.shape)} != {tuple(ref64.shape)}"
    scale = max(1.0, ref64.abs().max().item())
    err = (fast.double() - ref64).abs().max().item()
    err_low = (low.double() - ref64).abs().max().item()
    bound = k * err_low + floor * scale
    assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g} (torch {low.dtype} error {err_low:.3g})"


def _ends(n: int, count: int) -> torch.Tensor:
    """Indices of the first and the last ``count`` of ``n`` (the last ones are past 2**31 elements)."""
    return torch.cat([torch.arange(count), torch.arange(n - count, n)]).to(DEVICE)


# ------------------------------------------------------------------------------------------------------- attention


def _assert_attention_rows(got: list[torch.Tensor], inputs: list[torch.Tensor], *, num_docs: int, doc: int) -> None:
    """``got`` = (out, dq, dk, dv) of the fast op on some whole causal documents of ``doc`` tokens and some heads,
    against the reference on just those: ``inputs`` = (q, k, v, dout) cut to the same documents and heads."""
    from veofast.ops.attention import varlen_attention_reference

    cu = torch.arange(0, num_docs * doc + 1, doc, dtype=torch.int32, device=inputs[0].device)

    def reference(dtype):
        q, k, v = (t.to(dtype).clone().requires_grad_() for t in inputs[:3])
        out = varlen_attention_reference(q, k, v, cu, cu, doc, doc, causal=True)
        return (out.detach(), *torch.autograd.grad(out, (q, k, v), inputs[3].to(dtype)))

    for name, fast, low, ref64 in zip(["out", "dq", "dk", "dv"], got, reference(BF16), reference(torch.float64)):
        _assert_bound(name, fast, low, ref64, floor=4e-3)


@pytest.mark.gpu
def test_gpu_attention_head_major_wrapped_head_offset():
    """q, k, v, dout as (T, H, D) views of (H, T, D) storage (head stride T * D = 2**24), T = 2**17, H = 129, D = 128:
    the pointer path (no TMA for this layout) offsets head h by ``h * stride_h``, int32 before the fix, which wrapped
    to -2**31 for head 128 in the forward, dQ and dK/dV kernels. Fwd + bwd, causal, documents of 128 tokens; the
    last two documents of heads 0, 127 and 128 against the reference. Peak ~36 GB."""
    from veofast.ops.attention import varlen_attention

    _need_gib(40)
    T, H, D, DOC = 2**17, 129, 128, 128
    gen = _gen()
    bases = [_randn(H, T, D, gen=gen) for _ in range(4)]
    for b in bases[:3]:
        b.requires_grad_()
    q, k, v, dout = (b.transpose(0, 1) for b in bases)
    assert q.stride() == (D, T * D, 1) and (H - 1) * q.stride(1) >= LIMIT
    cu = torch.arange(0, T + 1, DOC, dtype=torch.int32, device=DEVICE)
    out = varlen_attention(q, k, v, cu, cu, DOC, DOC, causal=True, backend="triton")
    grads = torch.autograd.grad(out, (q, k, v), dout)
    tokens, heads = slice(T - 2 * DOC, T), [0, 127, 128]
    inputs = [t[tokens][:, heads].detach().clone() for t in (q, k, v, dout)]
    got = [t[tokens][:, heads].detach().clone() for t in (out, *grads)]
    del bases, q, k, v, dout, out, grads

    _assert_attention_rows(got, inputs, num_docs=2, doc=DOC)


@pytest.mark.gpu
def test_gpu_attention_many_tokens():
    """Token-major q (T, 128, 128) with T = 2**17 + 256 (2**31 + 2**22 elements), GQA with 8 KV heads, TMA path on
    sm90: token offsets were already int64 / TMA coordinates. Fwd + bwd over causal documents of 256 tokens; the
    last document, KV heads 0 and 7 with their 32 query heads, against the reference. Peak ~19 GB."""
    from veofast.ops.attention import varlen_attention

    _need_gib(24)
    T, HQ, HK, D, DOC = 2**17 + 256, 128, 8, 128, 256
    gen = _gen(1)
    q, k, v = (_randn(T, h, D, gen=gen).requires_grad_() for h in (HQ, HK, HK))
    dout = _randn(T, HQ, D, gen=gen)
    assert q.numel() > LIMIT
    cu = torch.arange(0, T + 1, DOC, dtype=torch.int32, device=DEVICE)
    out = varlen_attention(q, k, v, cu, cu, DOC, DOC, causal=True, backend="triton")
    grads = torch.autograd.grad(out, (q, k, v), dout)
    tokens, q_heads, kv_heads = slice(T - DOC, T), [*range(16), *range(112, 128)], [0, 7]
    inputs = [
        t[tokens][:, hs].detach().clone() for t, hs in zip((q, k, v, dout), (q_heads, kv_heads, kv_heads, q_heads))
    ]
    got = [t[tokens][:, hs].detach() for t, hs in zip((out, *grads), (q_heads, q_heads, kv_heads, kv_heads))]
    del q, k, v, dout, out, grads

    _assert_attention_rows(got, inputs, num_docs=1, doc=DOC)


# ------------------------------------------------------------------------------------------------------------ rope


def _inv_freq(head_dim: int) -> torch.Tensor:
    return 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2, device=DEVICE, dtype=torch.float32) / head_dim)


def _check_rope(name, got, q_small, k_small, positions, inv_freq):
    from veofast.ops.rope import apply_rotary_reference

    low = apply_rotary_reference(q_small, k_small, positions, inv_freq)[0]
    ref64 = apply_rotary_reference(q_small.double(), k_small.double(), positions, inv_freq)[0]
    _assert_bound(name, got, low, ref64, floor=2e-2)


@pytest.mark.gpu
def test_gpu_rope_head_major_wrapped_head_offset():
    """q as a (T, H, D) view of (H, T, D) storage, T = 2**17, H = 129, D = 128: the kernel offset head h by
    ``h * stride_h`` in int32 before the fix, which wrapped to -2**31 for head 128 (loads, and the stores of the
    in-place rotation). Out of place, then in place; the last 8 tokens of heads 0, 127, 128. Peak ~9 GB."""
    from veofast.ops.rope import apply_rotary

    _need_gib(12)
    T, H, D = 2**17, 129, 128
    gen = _gen(2)
    q = _randn(H, T, D, gen=gen).transpose(0, 1)
    k = _randn(T, 2, D, gen=gen)
    assert (H - 1) * q.stride(1) >= LIMIT
    positions = torch.randint(0, 8192, (T,), generator=gen, device=DEVICE)
    inv_freq = _inv_freq(D)
    tokens, heads = slice(T - 8, T), [0, 127, 128]
    q_small, k_small = q[tokens][:, heads].clone(), k[tokens].clone()
    q_out, _ = apply_rotary(q, k, positions, inv_freq, backend="triton")
    got = q_out[tokens][:, heads].clone()
    del q_out
    with torch.no_grad():
        apply_rotary(q, k, positions, inv_freq, inplace=True, backend="triton")
    got_inplace = q[tokens][:, heads].clone()
    del q, k
    _check_rope("q_out", got, q_small, k_small, positions[tokens], inv_freq)
    _check_rope("q rotated in place", got_inplace, q_small, k_small, positions[tokens], inv_freq)


@pytest.mark.gpu
def test_gpu_rope_many_tokens():
    """Token-major q (2**17 + 8, 128, 128), 2**31 + 2**17 elements: token offsets were already int64. The last 8
    tokens of heads 0 and 127, and of k. Peak ~9 GB."""
    from veofast.ops.rope import apply_rotary, apply_rotary_reference

    _need_gib(12)
    T, H, D = 2**17 + 8, 128, 128
    gen = _gen(3)
    q, k = _randn(T, H, D, gen=gen), _randn(T, 8, D, gen=gen)
    assert q.numel() > LIMIT
    positions = torch.randint(0, 8192, (T,), generator=gen, device=DEVICE)
    inv_freq = _inv_freq(D)
    q_out, k_out = apply_rotary(q, k, positions, inv_freq, backend="triton")
    tokens, heads = slice(T - 8, T), [0, 127]
    q_small, k_small = q[tokens][:, heads].clone(), k[tokens].clone()
    got_q, got_k = q_out[tokens][:, heads].clone(), k_out[tokens].clone()
    del q, k, q_out, k_out
    _check_rope("q_out", got_q, q_small, k_small, positions[tokens], inv_freq)
    low = apply_rotary_reference(q_small, k_small, positions[tokens], inv_freq)[1]
    ref64 = apply_rotary_reference(q_small.double(), k_small.double(), positions[tokens], inv_freq)[1]
    _assert_bound("k_out", got_k, low, ref64, floor=2e-2)


# --------------------------------------------------------------------------------------------------------- rms_norm


def _check_rms_norm(got_y, got_dx, x_small, dy_small, weight, eps):
    from veofast.ops.norm import rms_norm_reference

    def reference(dtype):
        x = x_small.to(dtype).clone().requires_grad_()
        y = rms_norm_reference(x, weight.to(dtype), eps)
        return y.detach(), torch.autograd.grad(y, x, dy_small.to(dtype))[0]

    (low_y, low_dx), (ref_y, ref_dx) = reference(BF16), reference(torch.float64)
    _assert_bound("y", got_y, low_y, ref_y, floor=2e-2)
    _assert_bound("dx", got_dx, low_dx, ref_dx, floor=2e-2)


@pytest.mark.gpu
def test_gpu_rms_norm_wrapped_row_index():
    """2**31 + 64 rows of one element (eps = 1, so that y and dx are O(1)): the forward's row index
    ``program * BLOCK_M`` was int32 before the fix and wrapped for the programs past row 2**31 (the int64 row
    offset came after it). Fwd + bwd; the first and last 64 rows. Peak ~18 GB."""
    from veofast.ops.norm import rms_norm

    _need_gib(20)
    n, eps = LIMIT + 64, 1.0
    gen = _gen(4)
    x = _randn(n, 1, gen=gen).requires_grad_()
    weight = torch.tensor([1.5], device=DEVICE, dtype=BF16)
    y = rms_norm(x, weight, eps, backend="triton")
    dy = _randn(n, 1, gen=gen)
    (dx,) = torch.autograd.grad(y, x, dy)
    rows = _ends(n, 64)
    got_y, got_dx, x_small, dy_small = y[rows].detach(), dx[rows], x[rows].detach(), dy[rows]
    del x, y, dy, dx
    _check_rms_norm(got_y, got_dx, x_small, dy_small, weight, eps)


@pytest.mark.gpu
def test_gpu_rms_norm_large_activations():
    """(T, H) = (2**19 + 8, 4096), 2**31 + 2**15 elements: the row offsets were already int64. Fwd + bwd; the first
    and last 8 rows. Peak ~18 GB."""
    from veofast.ops.norm import rms_norm

    _need_gib(20)
    n, hidden, eps = 2**19 + 8, 4096, 1e-6
    gen = _gen(5)
    x = _randn(n, hidden, gen=gen).requires_grad_()
    weight = (1.0 + 0.5 * _randn(hidden, gen=gen, dtype=torch.float32)).to(BF16)
    y = rms_norm(x, weight, eps, backend="triton")
    dy = _randn(n, hidden, gen=gen)
    (dx,) = torch.autograd.grad(y, x, dy)
    rows = _ends(n, 8)
    got_y, got_dx, x_small, dy_small = y[rows].detach(), dx[rows], x[rows].detach(), dy[rows]
    del x, y, dy, dx
    _check_rms_norm(got_y, got_dx, x_small, dy_small, weight, eps)


# ----------------------------------------------------------------------------------------------------------- swiglu


def _check_swiglu(got, gate_small, up_small, dy_small):
    from veofast.ops.swiglu import swiglu_reference

    def reference(dtype):
        g, u = (t.to(dtype).clone().requires_grad_() for t in (gate_small, up_small))
        y = swiglu_reference(g, u)
        return (y.detach(), *torch.autograd.grad(y, (g, u), dy_small.to(dtype)))

    for name, fast, low, ref64 in zip(["y", "dgate", "dup"], got, reference(BF16), reference(torch.float64)):
        _assert_bound(name, fast, low, ref64, floor=2e-2)


def _run_swiglu(n, inter, gen):
    """swiglu on the two halves of a (n, 2 * inter) projection, fwd + bwd; the first and last 8 rows."""
    from veofast.ops.swiglu import swiglu

    projection = _randn(n, 2 * inter, gen=gen).requires_grad_()
    gate, up = projection[:, :inter], projection[:, inter:]
    y = swiglu(gate, up, backend="triton")
    dy = _randn(n, inter, gen=gen)
    grads = torch.autograd.grad(y, (gate, up), dy)
    rows = _ends(n, 8)
    got = [t[rows].detach() for t in (y, *grads)]
    small = [t[rows].detach() for t in (gate, up, dy)]
    return got, small


@pytest.mark.gpu
def test_gpu_swiglu_wrapped_row_index():
    """2**31 + 64 rows of one element (gate and up: the halves of an (N, 2) tensor): the row index
    ``(program // column blocks) * BLOCK_M`` was int32 before the fix and wrapped for the last program (rows from
    2**31). Fwd + bwd; the first and last 8 rows. Peak ~26 GB."""
    _need_gib(30)
    got, small = _run_swiglu(LIMIT + 64, 1, _gen(6))
    gc.collect()
    _check_swiglu(got, *small)


@pytest.mark.gpu
def test_gpu_swiglu_large_activations():
    """(T, I) = (2**19 + 1, 4096) halves of a (T, 8192) projection, 2**31 + 4096 elements each: the row offsets were
    already int64. Fwd + bwd; the first and last 8 rows. Peak ~26 GB."""
    _need_gib(30)
    got, small = _run_swiglu(2**19 + 1, 4096, _gen(7))
    gc.collect()
    _check_swiglu(got, *small)


# -------------------------------------------------------------------------------------------------------------- MoE


@pytest.mark.gpu
def test_gpu_moe_permute_unpermute_many_rows():
    """T = 65537 tokens, top-8 of 64 experts, H = 4096: rows (T*K, H) = 2**31 + 2**15 elements, as in an MoE layer of
    64k tokens. Row offsets were already int64. Permute -> unpermute, fwd + bwd; the rows past 2**31 elements are
    exact copies of their tokens, and the tokens that own the last 16 rows match the reference (output, hidden and
    weight gradients). Peak ~11 GB."""
    from veofast.ops.moe import moe_permute, moe_unpermute

    _need_gib(14)
    T, K, E, H = 65537, 8, 64, 4096
    gen = _gen(8)
    hidden = _randn(T, H, gen=gen).requires_grad_()
    weights, ids = torch.softmax(_randn(T, E, gen=gen, dtype=torch.float32), dim=-1).topk(K, dim=-1)
    weights.requires_grad_()
    perm = moe_permute(hidden, ids, E, check_ids=False, backend="triton")
    assert perm.rows.numel() > LIMIT
    out = moe_unpermute(perm.rows, perm.row_index, weights, backend="triton")
    dout = _randn(T, H, gen=gen)
    grad_hidden, grad_weights = torch.autograd.grad(out, (hidden, weights), dout)
    rows = perm.rows.shape[0]
    last_slots = torch.nonzero(perm.row_index >= rows - 16).squeeze(1)
    assert last_slots.numel() == 16
    copied = perm.rows[perm.row_index[last_slots].long()].detach()
    tokens = torch.unique(last_slots // K)
    got = [out[tokens].detach(), grad_hidden[tokens], grad_weights[tokens]]
    small = [hidden[tokens].detach(), ids[tokens], weights[tokens].detach(), dout[tokens]]
    expected_copies = hidden[last_slots // K].detach()
    del hidden, weights, perm, out, dout, grad_hidden, grad_weights
    assert torch.equal(copied, expected_copies)

    def reference(dtype, weight_dtype):
        h = small[0].to(dtype).clone().requires_grad_()
        w = small[2].to(weight_dtype).clone().requires_grad_()
        p = moe_permute(h, small[1], E, backend="torch")
        o = moe_unpermute(p.rows, p.row_index, w, backend="torch")
        return (o.detach(), *torch.autograd.grad(o, (h, w), small[3].to(dtype)))

    low, ref64 = reference(BF16, torch.float32), reference(torch.float64, torch.float64)
    for name, fast, lo, r64 in zip(["out", "grad_hidden", "grad_weights"], got, low, ref64):
        _assert_bound(name, fast, lo, r64, floor=1e-2 if fast.dtype == BF16 else 1e-5, k=4.0)


@pytest.mark.gpu
def test_gpu_expert_swiglu_many_rows():
    """The expert FFN's SwiGLU (kernels/moe.py) on h (M, 2I) = (2**19 + 8, 4096), 2**31 + 2**15 elements: the row
    offsets were already int64. Forward and backward (which recomputes a); the first and last 8 rows. Peak
    ~16 GB."""
    from veofast.kernels import moe as moe_kernels

    _need_gib(18)
    M, inter = 2**19 + 8, 2048
    gen = _gen(9)
    h = _randn(M, 2 * inter, gen=gen)
    end = torch.tensor([M], dtype=torch.int32, device=DEVICE)
    a = moe_kernels.swiglu(h, end)
    grad_a = _randn(M, inter, gen=gen)
    grad_h, a_again = moe_kernels.swiglu_backward(h, grad_a, end)
    rows = _ends(M, 8)
    got = [a[rows], grad_h[rows, :inter], grad_h[rows, inter:]]
    got_again = [a_again[rows], *got[1:]]
    small = [h[rows, :inter], h[rows, inter:], grad_a[rows]]
    del h, a, grad_a, grad_h, a_again
    _check_swiglu(got, *small)
    _check_swiglu(got_again, *small)  # the a that the backward recomputes


def _check_gemm(name, fast, low, ref64):
    _assert_bound(name, fast, low, ref64, floor=1e-2, k=4.0)


@pytest.mark.gpu
def test_gpu_grouped_mm_many_rows():
    """veofast's Triton grouped GEMMs (torch._grouped_mm takes bf16 on sm90, so the kernels are called directly) on
    x (M, K) = (2**19 + 8, 4096), 2**31 + 2**15 elements, 4 experts, the last one owning the last 256 rows: the row
    offsets were already int64. Forward rows and the last expert's weight gradient against the reference. Peak
    ~5 GB."""
    from veofast.kernels.grouped_gemm import grouped_mm, grouped_mm_wgrad

    _need_gib(8)
    M, K, N = 2**19 + 8, 4096, 64
    gen = _gen(10)
    x = _randn(M, K, gen=gen)
    w = _randn(4, K, N, gen=gen) / 64
    dy = _randn(M, N, gen=gen)
    offsets = torch.tensor([2**17, 2**18, M - 256, M], dtype=torch.int32, device=DEVICE)
    out = grouped_mm(x, w, offsets)
    dw = grouped_mm_wgrad(x, dy, offsets)
    got_out, got_dw = out[-256:].clone(), dw[3].clone()
    x_small, dy_small = x[-256:].clone(), dy[-256:].clone()
    del x, dy, out, dw
    _check_gemm("out", got_out, x_small @ w[3], x_small.double() @ w[3].double())
    _check_gemm("dw", got_dw, x_small.T @ dy_small, x_small.double().T @ dy_small.double())


@pytest.mark.gpu
def test_gpu_grouped_mm_wrapped_weight_offset():
    """One expert's weight of 2**31 + 2**14 elements, passed as the transpose of an (E, N, K) linear weight
    (N = 2**25 + 256, K = 64, column stride K), as ``expert_ffn`` passes its weights: the weight tile's column offsets
    ``cols * stride_wn`` were int32 before the fix and wrapped for the last 256 columns. The first 64 and the last
    256 output columns against the reference. Peak ~7 GB."""
    from veofast.kernels.grouped_gemm import grouped_mm

    _need_gib(9)
    K, M = 64, 32
    N = LIMIT // K + 256
    gen = _gen(11)
    linear = _randn(1, N, K, gen=gen)
    w = linear.transpose(1, 2)
    assert (N - 1) * w.stride(2) >= LIMIT
    x = _randn(M, K, gen=gen)
    out = grouped_mm(x, w, torch.tensor([M], dtype=torch.int32, device=DEVICE))
    cols = torch.cat([torch.arange(64), torch.arange(N - 256, N)]).to(DEVICE)
    got, w_small = out[:, cols].clone(), w[0][:, cols].clone()
    del linear, w, out
    _check_gemm("out", got, x @ w_small, x.double() @ w_small.double())


@pytest.mark.gpu
def test_gpu_grouped_mm_wgrad_wrapped_output_offset():
    """A weight gradient block (P, Q) = (2**15 + 1, 2**16) of one expert, 2**31 + 2**16 elements: the output row
    offset ``p * stride_op`` was int32 before the fix and wrapped for row 2**15. Rows 0, P - 2 and P - 1 against the
    reference. Peak ~5 GB."""
    from veofast.kernels.grouped_gemm import grouped_mm_wgrad

    _need_gib(7)
    P, Q, M = 2**15 + 1, 2**16, 64
    gen = _gen(12)
    a, b = _randn(M, P, gen=gen), _randn(M, Q, gen=gen)
    dw = grouped_mm_wgrad(a, b, torch.tensor([M], dtype=torch.int32, device=DEVICE))
    assert dw.numel() > LIMIT
    ps = [0, P - 2, P - 1]
    got = dw[0, ps].clone()
    del dw
    _check_gemm("dw", got, a[:, ps].T @ b, a[:, ps].double().T @ b.double())


@pytest.mark.gpu
def test_gpu_zero_rows_from_wrapped_row_index():
    """``zero_rows_from`` (the input gradients of rows past the last expert) on 2**31 + 1024 rows of one element:
    the row index ``program * BLOCK_M`` was int32 before the fix; for the last program it wrapped negative, so the
    program took its rows for ones before ``end`` and left rows 2**31.. unzeroed. Peak ~4.3 GB."""
    from veofast.kernels.grouped_gemm import zero_rows_from

    _need_gib(6)
    n, end = LIMIT + 1024, LIMIT - 1024
    x = torch.ones(n, 1, device=DEVICE, dtype=BF16)
    zero_rows_from(x, torch.tensor([end], dtype=torch.int32, device=DEVICE))
    head, kept, zeroed = x[:8].float(), x[end - 8 : end].float(), x[end:].float()
    del x
    assert bool((head == 1).all()) and bool((kept == 1).all())
    assert zeroed.numel() == 2048 and int(torch.count_nonzero(zeroed)) == 0


# ---------------------------------------------------------------------------------------------------- cross-entropy


@pytest.mark.gpu
def test_gpu_cross_entropy_rows_large_logits():
    """The row kernel of the fused linear cross-entropy on a logits chunk (8193, 262144), 2**31 + 2**18 elements (one
    chunk of 8192 tokens at V = 262144, H = 8192 holds 2**31): the row offsets were already int64. Losses and the
    gradients written over the logits of rows 0, 8191 and 8192 against float64. Peak ~4.3 GB."""
    from veofast.kernels.cross_entropy import ce_rows

    _need_gib(6)
    n, vocab = 8193, 2**18
    gen = _gen(13)
    logits = _randn(n, vocab, gen=gen).mul_(3)
    labels = torch.randint(0, vocab, (n,), generator=gen, device=DEVICE)
    rows = torch.tensor([0, n - 2, n - 1], device=DEVICE)
    x_small, labels_small = logits[rows].clone(), labels[rows]
    loss = torch.empty(n, device=DEVICE, dtype=torch.float32)
    z = torch.empty_like(loss)
    scale = torch.ones((), device=DEVICE, dtype=torch.float32)
    kwargs = dict(ignore_index=-100, label_smoothing=0.0, lse_square_scale=0.0, softcap=None, compute_grad=True)
    ce_rows(logits, labels, scale, loss, z, **kwargs)
    got_loss, got_grad = loss[rows], logits[rows].clone()
    del logits

    def reference(dtype):
        x = x_small.to(dtype)
        lse = torch.logsumexp(x, dim=-1)
        onehot = torch.nn.functional.one_hot(labels_small, vocab).to(dtype)
        return lse - x.gather(1, labels_small[:, None]).squeeze(1), torch.exp(x - lse[:, None]) - onehot

    (low_loss, low_grad), (ref_loss, ref_grad) = reference(torch.float32), reference(torch.float64)
    _assert_bound("loss", got_loss, low_loss, ref_loss, floor=1e-4)
    _assert_bound("dlogits", got_grad, low_grad.to(BF16), ref_grad, floor=1e-3)


# ------------------------------------------------------------------------------------------------ optimizer, casts


@pytest.mark.gpu
def test_gpu_adamw_update_large_tensor():
    """One AdamW update of a 2**31 + 1024-element fp32 parameter (bf16 gradient, fp32 moments, a clipping factor),
    like a 150k x 16k embedding: offsets were already int64. The first and last 1024 elements of the parameter and
    both moments against float64, as tests/engine/test_adamw.py compares fp32 steps. Peak ~30 GB."""
    from veofast.kernels.adamw import adamw_update_

    _need_gib(34)
    n = LIMIT + 1024
    gen = _gen(14)
    param = _randn(n, gen=gen, dtype=torch.float32)
    grad = _randn(n, gen=gen)
    exp_avg = _randn(n, gen=gen, dtype=torch.float32).mul_(0.1)
    exp_avg_sq = torch.rand(n, generator=gen, device=DEVICE, dtype=torch.float32).mul_(0.01)
    idx = _ends(n, 1024)
    p0, g0, m0, v0 = (t[idx].double() for t in (param, grad, exp_avg, exp_avg_sq))
    hyper = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, step=3)
    adamw_update_(param, grad, exp_avg, exp_avg_sq, **hyper, grad_scale=torch.tensor([0.5], device=DEVICE))
    got = [t[idx].clone() for t in (param, exp_avg, exp_avg_sq)]
    del param, grad, exp_avg, exp_avg_sq

    g = g0 * 0.5
    m = 0.9 * m0 + 0.1 * g
    v = 0.999 * v0 + 0.001 * g * g
    step, lr = hyper["step"], hyper["lr"]
    denom = v.sqrt() / (1 - 0.999**step) ** 0.5 + hyper["eps"]
    p = p0 * (1 - lr * hyper["weight_decay"]) - lr / (1 - 0.9**step) * m / denom
    for name, fast, want in zip(["param", "exp_avg", "exp_avg_sq"], got, [p, m, v]):
        torch.testing.assert_close(fast.double(), want, rtol=1e-5, atol=1e-6, msg=lambda s, name=name: f"{name}: {s}")


@pytest.mark.gpu
def test_gpu_cast_large_tensor():
    """bf16 -> fp32 cast (the backward of the mixed-precision casts) of 2**31 + 4096 elements: offsets were already
    int64. Bit-exact on the first 4096 and last 8192 elements. Peak ~13 GB."""
    from veofast.kernels.cast import cast_contiguous

    _need_gib(15)
    n = LIMIT + 4096
    x = _randn(n, gen=_gen(15))
    y = cast_contiguous(x, torch.float32)
    idx = _ends(n, 4096)
    got, want = y[idx].clone(), x[idx].float()
    tail_got, tail_want = y[-8192:].clone(), x[-8192:].float()
    del x, y
    assert torch.equal(got, want) and torch.equal(tail_got, tail_want)


# ------------------------------------------------------------------------------- the limits that remain (no GPU)


def test_moe_ops_refuse_2_31_slots():
    """T*K slots and permuted rows are counted by int32 indices (row_index, expert_offsets): at 2**31 the ops raise
    a ValueError naming the limit before anything runs (expanded views: no memory)."""
    from veofast.ops.moe import moe_ffn, moe_permute, moe_unpermute

    T, K, H = 2**28, 8, 4
    hidden = torch.zeros(1, H).expand(T, H)
    ids = torch.zeros(1, K, dtype=torch.int32).expand(T, K)
    weights = torch.ones(1, K).expand(T, K)
    with pytest.raises(ValueError, match=r"2\*\*31"):
        moe_permute(hidden, ids, 4)
    with pytest.raises(ValueError, match=r"2\*\*31"):
        moe_permute(hidden[:1], ids[:1], 4, num_rows=2**31)
    with pytest.raises(ValueError, match=r"2\*\*31"):
        moe_unpermute(hidden, torch.zeros(1, dtype=torch.int32).expand(T * K), weights)
    gate_up, down = torch.zeros(4, 2, H), torch.zeros(4, H, 1)
    with pytest.raises(ValueError, match=r"2\*\*31"):
        moe_ffn(hidden, ids, weights, gate_up, down)


def test_triton_launchers_refuse_int32_row_limits():
    """The grouped GEMMs index rows in int32 (int32 expert offsets) and the permute indexes its per-block counts
    in int32: past those limits the launchers raise ValueError before allocating or launching anything."""
    from veofast.kernels.grouped_gemm import grouped_mm, grouped_mm_wgrad
    from veofast.kernels.moe_permute import permute

    x = torch.zeros(1, 4).expand(2**31, 4)
    offsets = torch.tensor([4], dtype=torch.int32)
    with pytest.raises(ValueError, match="rows"):
        grouped_mm(x, torch.zeros(1, 4, 4), offsets)
    with pytest.raises(ValueError, match="rows"):
        grouped_mm_wgrad(x, x, offsets)
    tokens = 2**27
    with pytest.raises(ValueError, match=r"2\*\*31"):
        permute(torch.zeros(1, 4).expand(tokens, 4), torch.zeros(1, 1, dtype=torch.int32).expand(tokens, 1), 2048)
