"""Tests of the MoE ops (veofast.ops.moe): permute, unpermute, grouped_mm, expert_ffn and moe_ffn.

Every fast path is compared with its plain-torch reference run in float64 (the oracle), forward and backward,
within ``k * |reference in the test dtype - oracle| + floor``. On CPU the Triton kernels run under the
interpreter (fp32/fp16); the bf16 tests, the ``torch._grouped_mm`` path and the no-host-sync check need a GPU.
"""

from __future__ import annotations

import pytest
import torch

from veofast.ops.moe import (
    MoEPermutation,
    expert_ffn,
    expert_ffn_reference,
    grouped_mm,
    grouped_mm_reference,
    moe_ffn,
    moe_ffn_reference,
    moe_permute,
    moe_permute_reference,
    moe_unpermute,
    moe_unpermute_reference,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _routing(num_tokens: int, num_experts: int, topk: int, gen: torch.Generator, device=DEVICE):
    """Softmax top-k routing of random logits: ids (T, K) int64 and weights (T, K) float32."""
    logits = torch.randn(num_tokens, num_experts, generator=gen, device=device)
    weights, ids = torch.softmax(logits, dim=-1).topk(topk, dim=-1)
    return ids, weights


def _assert_close(fast, ref_dtype, ref64, *, k: float = 4.0, name: str = "") -> None:
    """|fast - ref64| <= k * |ref_dtype - ref64| + floor * max(|ref64|, 1), in the max norm."""
    err = (fast.double() - ref64).abs().max().item() if ref64.numel() else 0.0
    base = (ref_dtype.double() - ref64).abs().max().item() if ref64.numel() else 0.0
    scale = max(ref64.abs().max().item() if ref64.numel() else 0.0, 1.0)
    bound = k * base + FLOOR[fast.dtype] * scale
    assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g} (reference in {fast.dtype}: {base:.3g})"


def _leaves(*tensors, dtype):
    return [t.detach().to(dtype).requires_grad_(t.is_floating_point()) for t in tensors]


def _run(fn, inputs, grad_out=None):
    """fn(*inputs), a (given or random float64) output gradient, and the gradients of <fn(...), grad_out> wrt
    the inputs that require grad."""
    out = fn(*inputs)
    if grad_out is None:
        gen = torch.Generator(device=DEVICE).manual_seed(1)
        grad_out = torch.randn(out.shape, generator=gen, device=DEVICE, dtype=torch.float64)
    grads = torch.autograd.grad(out, [t for t in inputs if t.requires_grad], grad_out.to(out.dtype))
    return out.detach(), grad_out, grads


def _check_op(fast_fn, ref_fn, inputs, dtype, *, k: float = 4.0):
    """Compare fast_fn in `dtype` with ref_fn in `dtype` and in float64, forward and all input gradients."""
    ref64_out, grad_out, ref64_grads = _run(ref_fn, _leaves(*inputs, dtype=torch.float64))
    fast_out, _, fast_grads = _run(fast_fn, _leaves(*inputs, dtype=dtype), grad_out)
    ref_out, _, ref_grads = _run(ref_fn, _leaves(*inputs, dtype=dtype), grad_out)
    assert fast_out.dtype == ref_out.dtype and fast_out.shape == ref64_out.shape
    _assert_close(fast_out, ref_out, ref64_out, k=k, name="output")
    for i, (f, r, r64) in enumerate(zip(fast_grads, ref_grads, ref64_grads, strict=True)):
        assert f.dtype == r.dtype and f.shape == r64.shape, f"grad {i}: {f.dtype} {tuple(f.shape)}"
        _assert_close(f, r, r64, k=k, name=f"grad {i}")


def _offsets(sizes, device=DEVICE) -> torch.Tensor:
    return torch.tensor(sizes, device=device).cumsum(0).to(torch.int32)


# ------------------------------------------------------------------------------------------------- permute

ROUTING_CASES = [(1, 4, 1), (7, 3, 2), (97, 8, 8), (97, 16, 3)]  # (T, E, K): odd token counts, top-1 and top-8


@pytest.mark.parametrize("num_tokens,num_experts,topk", ROUTING_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_permute_matches_reference(num_tokens, num_experts, topk, dtype):
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    ids, _ = _routing(num_tokens, num_experts, topk, gen)
    hidden = torch.randn(num_tokens, 40, generator=gen, device=DEVICE).to(dtype)
    fast = moe_permute(hidden, ids, num_experts, backend="triton")
    ref = moe_permute_reference(hidden, ids, num_experts)
    assert isinstance(fast, MoEPermutation)
    for name, f, r in zip(MoEPermutation._fields, fast, ref, strict=True):
        assert f.dtype == r.dtype and torch.equal(f, r), name
    assert fast.expert_offsets.dtype == torch.int32 and fast.row_index.dtype == torch.int32
    assert fast.tokens_per_expert.dtype == torch.int64

    _check_op(
        lambda h: moe_permute(h, ids, num_experts, backend="triton").rows,
        lambda h: moe_permute_reference(h, ids, num_experts).rows,
        [hidden.float()],
        dtype,
    )


@pytest.mark.parametrize("case", ["one_expert", "empty_experts", "single_expert", "many_experts"])
def test_permute_skewed_routing(case):
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    num_tokens, num_experts, topk = 97, 12, 2
    if case == "one_expert":  # every token's both slots on experts 5 and 9: the others are empty
        ids = torch.tensor([5, 9], device=DEVICE).repeat(num_tokens, 1)
    elif case == "empty_experts":
        ids = torch.randint(0, 3, (num_tokens, topk), generator=gen, device=DEVICE) * 4
    elif case == "single_expert":  # E = 1, K = 1
        num_experts, topk = 1, 1
        ids = torch.zeros(num_tokens, 1, dtype=torch.int32, device=DEVICE)
    else:  # more experts than one histogram chunk, not a power of two
        num_experts = 300
        ids, _ = _routing(num_tokens, num_experts, topk, gen)
    hidden = torch.randn(num_tokens, 24, generator=gen, device=DEVICE)
    fast = moe_permute(hidden, ids, num_experts, backend="triton")
    ref = moe_permute_reference(hidden, ids, num_experts)
    for name, f, r in zip(MoEPermutation._fields, fast, ref, strict=True):
        assert torch.equal(f, r), name
    assert int(fast.expert_offsets[-1]) == num_tokens * topk


# ----------------------------------------------------------------------------------------------- unpermute


@pytest.mark.parametrize("num_tokens,num_experts,topk", ROUTING_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_unpermute_matches_reference(num_tokens, num_experts, topk, dtype):
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    ids, weights = _routing(num_tokens, num_experts, topk, gen)
    row_index = moe_permute_reference(torch.zeros(num_tokens, 1, device=DEVICE), ids, num_experts).row_index
    rows = torch.randn(num_tokens * topk, 40, generator=gen, device=DEVICE)

    def fast(r, w):
        return moe_unpermute(r, row_index, w, backend="triton")

    def ref(r, w):
        return moe_unpermute_reference(r, row_index, w)

    _check_op(fast, ref, [rows, weights], dtype)


# Kernel tunables (veofast.kernels.moe_permute.CONFIGS) that make the programs loop: several column chunks per row,
# one token per step, small count blocks (rows=16 and top-8: two tokens per block).
KERNEL_CONFIGS = [{"rows": 16, "tile": 128}, {"rows": 64, "tile": 512}]


@pytest.mark.parametrize("config", KERNEL_CONFIGS)
@pytest.mark.parametrize("topk", [3, 8])
def test_kernel_configs_match_reference(config, topk):
    """The launchers with other tunables than the defaults: permute exact, the rest against float64."""
    from veofast.kernels import moe_permute as kernels

    gen = torch.Generator(device=DEVICE).manual_seed(0)
    num_tokens, num_experts, width = 13, 10, 40
    ids, weights = _routing(num_tokens, num_experts, topk, gen)
    hidden = torch.randn(num_tokens, width, generator=gen, device=DEVICE)
    grad = torch.randn(num_tokens, width, generator=gen, device=DEVICE)
    grad_rows = torch.randn(num_tokens * topk, width, generator=gen, device=DEVICE)
    fast = kernels.permute(hidden, ids, num_experts, config=config)
    for name, f, r in zip(MoEPermutation._fields, fast, moe_permute_reference(hidden, ids, num_experts), strict=True):
        assert torch.equal(f, r), name
    rows, row_index = fast[0], fast[2]
    tile = {"tile": config["tile"]}

    def close(out, ref64):
        torch.testing.assert_close(out, ref64.float(), rtol=1e-5, atol=1e-5)

    out = kernels.unpermute(rows, row_index, weights, num_tokens, topk, config=tile)
    close(out, moe_unpermute_reference(rows.double(), row_index, weights.double()))
    summed = kernels.unpermute(grad_rows, row_index, None, num_tokens, topk, config=tile)  # the permute backward
    close(summed, moe_unpermute_reference(grad_rows.double(), row_index, torch.ones_like(weights).double()))
    rows64, weights64 = rows.double().requires_grad_(), weights.double().requires_grad_()
    ref = moe_unpermute_reference(rows64, row_index, weights64)
    ref_grads = torch.autograd.grad(ref, (rows64, weights64), grad.double())
    grads = kernels.unpermute_backward(grad, rows, row_index, weights, rows_grad=True, weights_grad=True, config=tile)
    for g, r in zip(grads, ref_grads, strict=True):
        close(g, r)


def test_unpermute_weights_keep_their_dtype():
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    ids, weights = _routing(7, 4, 2, gen)
    row_index = moe_permute_reference(torch.zeros(7, 1, device=DEVICE), ids, 4).row_index
    rows = torch.randn(14, 16, generator=gen, device=DEVICE, dtype=torch.float16, requires_grad=True)
    weights.requires_grad_(True)
    out = moe_unpermute(rows, row_index, weights, backend="triton")
    assert out.dtype == torch.float16
    out.float().sum().backward()
    assert weights.grad.dtype == torch.float32 and rows.grad.dtype == torch.float16


# ---------------------------------------------------------------------------------------------- grouped_mm

GROUP_SIZES = [[1], [0, 7, 0], [97, 0, 0, 0], [30, 0, 45, 22], [0, 0, 1]]


@pytest.mark.parametrize("sizes", GROUP_SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_grouped_mm_matches_reference(sizes, dtype):
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    offsets = _offsets(sizes)
    x = torch.randn(sum(sizes), 40, generator=gen, device=DEVICE)
    w = torch.randn(len(sizes), 40, 24, generator=gen, device=DEVICE) / 6

    _check_op(
        lambda a, b: grouped_mm(a, b, offsets, backend="triton"),
        lambda a, b: grouped_mm_reference(a, b, offsets),
        [x, w],
        dtype,
    )


def test_grouped_mm_transposed_weights_and_empty_expert_gradient():
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    sizes = [5, 0, 12]
    offsets = _offsets(sizes)
    x = torch.randn(17, 24, generator=gen, device=DEVICE, requires_grad=True)
    linear = torch.randn(3, 40, 24, generator=gen, device=DEVICE, requires_grad=True)  # (E, N, K) like nn.Linear
    out = grouped_mm(x, linear.transpose(1, 2), offsets, backend="triton")
    ref = grouped_mm_reference(x.detach(), linear.detach().transpose(1, 2), offsets)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert linear.grad.shape == linear.shape
    assert torch.count_nonzero(linear.grad[1]) == 0 and torch.count_nonzero(linear.grad[0]) > 0


@pytest.mark.parametrize("op", ["grouped_mm", "expert_ffn"])
def test_rows_past_the_last_expert_get_zero_gradient(op):
    """Rows at or past expert_offsets[-1] take no part: their input gradient is 0 on the Triton path too (the grouped
    GEMMs leave those rows unwritten)."""
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    offsets = _offsets([3, 0, 4])  # 7 of the 10 rows belong to an expert
    rows = torch.randn(10, 16, generator=gen, device=DEVICE, requires_grad=True)
    gate_up, down = _expert_weights(3, 16, 8, gen)
    grad_out = torch.randn(7, 16, generator=gen, device=DEVICE)  # the outputs past the end are not used

    def grad(backend):
        if op == "grouped_mm":
            out = grouped_mm(rows, gate_up.transpose(1, 2), offsets, backend=backend)
        else:
            out = expert_ffn(rows, offsets, gate_up, down, backend=backend)
        return torch.autograd.grad(out[:7], rows, grad_out)[0]

    got = grad("triton")  # unwritten rows would read NaN (tests/conftest.py)
    assert torch.equal(got[7:], torch.zeros_like(got[7:]))
    torch.testing.assert_close(got, grad("torch"), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------- expert_ffn, moe_ffn


def _expert_weights(num_experts, hidden_size, inter, gen):
    gate_up = torch.randn(num_experts, 2 * inter, hidden_size, generator=gen, device=DEVICE) / hidden_size**0.5
    down = torch.randn(num_experts, hidden_size, inter, generator=gen, device=DEVICE) / inter**0.5
    return gate_up, down


@pytest.mark.parametrize("sizes", [[13], [0, 30, 0, 1], [40, 17, 0]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_expert_ffn_matches_reference(sizes, dtype):
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    offsets = _offsets(sizes)
    rows = torch.randn(sum(sizes), 32, generator=gen, device=DEVICE)
    gate_up, down = _expert_weights(len(sizes), 32, 24, gen)
    _check_op(
        lambda r, gu, d: expert_ffn(r, offsets, gu, d, backend="triton"),
        lambda r, gu, d: expert_ffn_reference(r, offsets, gu, d),
        [rows, gate_up, down],
        dtype,
    )


@pytest.mark.parametrize("num_tokens,num_experts,topk", ROUTING_CASES[:3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_moe_ffn_matches_reference(num_tokens, num_experts, topk, dtype):
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    ids, weights = _routing(num_tokens, num_experts, topk, gen)
    hidden = torch.randn(num_tokens, 32, generator=gen, device=DEVICE)
    gate_up, down = _expert_weights(num_experts, 32, 24, gen)
    _check_op(
        lambda h, w, gu, d: moe_ffn(h, ids, w, gu, d, backend="triton"),
        lambda h, w, gu, d: moe_ffn_reference(h, ids, w, gu, d),
        [hidden, weights, gate_up, down],
        dtype,
    )


def test_moe_ffn_torch_backend_is_the_reference():
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    ids, weights = _routing(7, 4, 2, gen)
    hidden = torch.randn(7, 16, generator=gen, device=DEVICE)
    gate_up, down = _expert_weights(4, 16, 8, gen)
    out = moe_ffn(hidden, ids, weights, gate_up, down, backend="torch")
    assert torch.equal(out, moe_ffn_reference(hidden, ids, weights, gate_up, down))
    perm = moe_permute(hidden, ids, 4, backend="torch")
    rows_out = expert_ffn(perm.rows, perm.expert_offsets, gate_up, down, backend="torch")
    chained = moe_unpermute(rows_out, perm.row_index, weights, backend="torch")
    torch.testing.assert_close(chained, out)


def test_triton_path_checks_ids_or_masks_them_unchecked():
    """An id outside [0, E) raises by default on both paths; with check_ids=False (no host sync) the Triton path
    adds nothing for it."""
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    ids, weights = _routing(9, 4, 2, gen)
    ids[2, 1], ids[5, 0] = -1, 7
    hidden = torch.randn(9, 16, generator=gen, device=DEVICE)
    gate_up, down = _expert_weights(4, 16, 8, gen)
    for backend in ("triton", "torch"):
        with pytest.raises(ValueError, match=r"topk_ids must lie in \[0, num_experts=4\), got values in \[-1, 7\]"):
            moe_permute(hidden, ids, 4, backend=backend)
        with pytest.raises(ValueError, match=r"topk_ids must lie in \[0, num_experts=4\)"):
            moe_ffn(hidden, ids, weights, gate_up, down, backend=backend)
    perm = moe_permute(hidden, ids, 4, check_ids=False, backend="triton")
    assert perm.row_index.view(9, 2)[2, 1] == -1 and perm.row_index.view(9, 2)[5, 0] == -1
    assert int(perm.expert_offsets[-1]) == 16
    out = moe_ffn(hidden, ids, weights, gate_up, down, check_ids=False, backend="triton")
    kept = weights.clone()
    kept[2, 1] = kept[5, 0] = 0.0
    ref = moe_ffn_reference(hidden, ids.clamp(0, 3), kept, gate_up, down)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------- local experts (expert parallel ranks)

LOCAL_CASES = [(97, 12, 3, 4, 4), (13, 8, 8, 0, 2), (40, 6, 2, 5, 1), (1, 4, 1, 2, 2)]  # (T, E, K, first, L)


def _kept(ids: torch.Tensor, first: int, num_local: int) -> int:
    return int(((ids >= first) & (ids < first + num_local)).sum())


@pytest.mark.parametrize("num_tokens,num_experts,topk,first,num_local", LOCAL_CASES)
@pytest.mark.parametrize("exact_rows", [False, True])
def test_permute_local_experts_matches_reference(num_tokens, num_experts, topk, first, num_local, exact_rows):
    """Slots routed outside [first, first + L) are dropped on both paths; rows sized exactly or at T*K."""
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    ids, _ = _routing(num_tokens, num_experts, topk, gen)
    hidden = torch.randn(num_tokens, 40, generator=gen, device=DEVICE)
    kept = _kept(ids, first, num_local)
    num_rows = kept if exact_rows else None
    kwargs = {"first_expert": first, "num_rows": num_rows}
    fast = moe_permute(hidden, ids, num_local, backend="triton", **kwargs)
    ref = moe_permute_reference(hidden, ids, num_local, **kwargs)
    assert fast.rows.shape == ref.rows.shape == (kept if exact_rows else num_tokens * topk, 40)
    assert torch.equal(fast.rows[:kept], ref.rows[:kept]) and not ref.rows[kept:].any()
    for name in ("expert_offsets", "row_index", "tokens_per_expert"):
        assert torch.equal(getattr(fast, name), getattr(ref, name)), name
    local = (ids >= first) & (ids < first + num_local)
    assert torch.equal(ref.row_index.view_as(ids) >= 0, local) and int(ref.expert_offsets[-1]) == kept


def test_permute_with_too_few_rows():
    """The torch path raises; the Triton path (no sync) drops the slots whose rows would not exist."""
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    ids, _ = _routing(29, 6, 2, gen)
    hidden = torch.randn(29, 8, generator=gen, device=DEVICE)
    full = moe_permute_reference(hidden, ids, 6)
    with pytest.raises(ValueError, match="num_rows=40 is fewer than the 58 slots"):
        moe_permute(hidden, ids, 6, num_rows=40, backend="torch")
    fast = moe_permute(hidden, ids, 6, num_rows=40, backend="triton")
    assert torch.equal(fast.row_index, torch.where(full.row_index < 40, full.row_index, -1))
    assert torch.equal(fast.expert_offsets, full.expert_offsets.clamp(max=40))
    assert torch.equal(fast.rows, full.rows[:40])


def test_unpermute_skips_dropped_slots_on_both_paths():
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    ids, weights = _routing(11, 6, 3, gen)
    perm = moe_permute_reference(torch.zeros(11, 1, device=DEVICE), ids, 3, first_expert=2)
    rows = torch.randn(33, 16, generator=gen, device=DEVICE)
    want = moe_unpermute_reference(
        rows, perm.row_index.clamp(min=0), torch.where(perm.row_index.view(11, 3) >= 0, weights, 0)
    )
    for backend in ("torch", "triton"):
        got = moe_unpermute(rows, perm.row_index, weights, backend=backend)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("num_tokens,num_experts,topk,first,num_local", LOCAL_CASES[:3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_moe_ffn_local_experts_matches_reference(num_tokens, num_experts, topk, first, num_local, dtype):
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    ids, weights = _routing(num_tokens, num_experts, topk, gen)
    hidden = torch.randn(num_tokens, 32, generator=gen, device=DEVICE)
    gate_up, down = _expert_weights(num_local, 32, 24, gen)
    rows = _kept(ids, first, num_local)
    _check_op(
        lambda h, w, gu, d: moe_ffn(h, ids, w, gu, d, first_expert=first, num_rows=rows, backend="triton"),
        lambda h, w, gu, d: moe_ffn_reference(h, ids, w, gu, d, first_expert=first),
        [hidden, weights, gate_up, down],
        dtype,
    )


@pytest.mark.parametrize("kwargs", [{"first_expert": -1}, {"num_rows": -2}, {"num_rows": True}, {"num_rows": 3.0}])
def test_local_expert_arguments_are_checked(kwargs):
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    ids, weights = _routing(5, 4, 2, gen)
    hidden = torch.randn(5, 16, device=DEVICE)
    gate_up, down = _expert_weights(2, 16, 8, gen)
    name = next(iter(kwargs))
    for backend in ("torch", "triton"):
        with pytest.raises(ValueError, match=f"{name} must be an int >= "):
            moe_permute(hidden, ids, 2, backend=backend, **kwargs)
        with pytest.raises(ValueError, match=f"{name} must be an int >= "):
            moe_ffn(hidden, ids, weights, gate_up, down, backend=backend, **kwargs)


def test_moe_ffn_local_experts_is_the_full_layer_restricted():
    """The definition: local experts [first, first + L) of E add exactly what the full layer adds through them."""
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    ids, weights = _routing(23, 8, 4, gen)
    hidden = torch.randn(23, 16, generator=gen, device=DEVICE, dtype=torch.float64)
    gate_up, down = (w.double() for w in _expert_weights(8, 16, 8, gen))
    local = (ids >= 2) & (ids < 6)
    want = moe_ffn_reference(hidden, ids, torch.where(local, weights, 0).double(), gate_up, down)
    got = moe_ffn(hidden, ids, weights.double(), gate_up[2:6], down[2:6], first_expert=2, backend="torch")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------ bad input


def test_bad_inputs_raise_value_error():
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    ids, weights = _routing(5, 4, 2, gen)
    hidden = torch.randn(5, 16, device=DEVICE)
    gate_up, down = _expert_weights(4, 16, 8, gen)
    offsets = _offsets([3, 0, 4, 3])
    rows = torch.randn(10, 16, device=DEVICE)
    cases = [
        ("topk_ids", lambda: moe_permute(hidden, ids.float(), 4)),
        ("topk_ids", lambda: moe_permute(hidden, ids[:4], 4)),
        ("num_experts", lambda: moe_permute(hidden, ids, 0)),
        ("topk_ids", lambda: moe_permute(hidden, ids + 4, 4, backend="torch")),
        ("hidden", lambda: moe_permute(hidden[0], ids, 4)),
        ("row_index", lambda: moe_unpermute(rows, torch.arange(9, device=DEVICE), weights)),
        ("row_index", lambda: moe_unpermute(rows, torch.arange(10, device=DEVICE) + 1, weights, backend="torch")),
        ("topk_weights", lambda: moe_unpermute(rows, torch.arange(10, device=DEVICE), weights.long())),
        ("expert_offsets", lambda: grouped_mm(rows, gate_up.transpose(1, 2), offsets.long())),
        ("expert_offsets", lambda: grouped_mm(rows, gate_up.transpose(1, 2), offsets[:3])),
        ("expert_offsets", lambda: grouped_mm(rows, gate_up.transpose(1, 2), offsets.flip(0), backend="torch")),
        ("w", lambda: grouped_mm(rows, down.transpose(1, 2), offsets)),
        ("w", lambda: grouped_mm(rows, gate_up.transpose(1, 2).half(), offsets)),
        ("gate_up_proj", lambda: expert_ffn(rows, offsets, gate_up[:, :, :8], down)),
        ("down_proj", lambda: expert_ffn(rows, offsets, gate_up, down.transpose(1, 2))),
        ("down_proj", lambda: expert_ffn(rows, offsets, gate_up, down.double())),
        ("topk_weights", lambda: moe_ffn(hidden, ids, weights[:, :1], gate_up, down)),
        ("topk_ids", lambda: moe_ffn(hidden, ids - 1, weights, gate_up, down, backend="torch")),
        ("gate_up_proj", lambda: moe_ffn(hidden, ids, weights, gate_up[:, :15], down)),
        ("backend", lambda: moe_ffn(hidden, ids, weights, gate_up, down, backend="cuda")),
    ]
    for name, call in cases:
        with pytest.raises(ValueError, match=name):
            call()


# ------------------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens,num_experts,topk", [(1, 8, 1), (97, 16, 8), (2048, 64, 8)])
def test_gpu_moe_ffn_bf16(num_tokens, num_experts, topk):
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    ids, weights = _routing(num_tokens, num_experts, topk, gen)
    hidden = torch.randn(num_tokens, 256, generator=gen, device=DEVICE)
    gate_up, down = _expert_weights(num_experts, 256, 128, gen)
    _check_op(
        lambda h, w, gu, d: moe_ffn(h, ids, w, gu, d),
        lambda h, w, gu, d: moe_ffn_reference(h, ids, w, gu, d),
        [hidden, weights, gate_up, down],
        torch.bfloat16,
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("sizes", [[300, 0, 77, 1, 0, 500], [0, 0, 1024]])
def test_gpu_grouped_mm(dtype, sizes):
    """bf16 runs torch._grouped_mm on sm90; fp16/fp32 run veofast's Triton grouped GEMM."""
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    offsets = _offsets(sizes)
    x = torch.randn(sum(sizes), 256, generator=gen, device=DEVICE)
    linear = torch.randn(len(sizes), 384, 256, generator=gen, device=DEVICE) / 16
    _check_op(
        lambda a, b: grouped_mm(a, b.transpose(1, 2), offsets),
        lambda a, b: grouped_mm_reference(a, b.transpose(1, 2), offsets),
        [x, linear],
        dtype,
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_triton_grouped_gemm_kernels(dtype):
    """veofast's own Triton grouped GEMM kernels in 16-bit, also where torch._grouped_mm would be taken."""
    from veofast.kernels import grouped_gemm

    gen = torch.Generator(device=DEVICE).manual_seed(0)
    sizes = [300, 0, 77, 1, 0, 500]
    offsets = _offsets(sizes)
    x = torch.randn(sum(sizes), 200, generator=gen, device=DEVICE)  # K not a multiple of the block
    linear = torch.randn(len(sizes), 136, 200, generator=gen, device=DEVICE) / 14
    dy = torch.randn(sum(sizes), 136, generator=gen, device=DEVICE)
    ref = grouped_mm_reference(x.double(), linear.double().transpose(1, 2), offsets)
    out = grouped_gemm.grouped_mm(x.to(dtype), linear.to(dtype).transpose(1, 2), offsets)
    base = grouped_mm_reference(x.to(dtype), linear.to(dtype).transpose(1, 2), offsets)
    _assert_close(out, base, ref, name="fwd")
    bounds = list(zip([0, *offsets[:-1].tolist()], offsets.tolist(), strict=True))
    ref_dw = torch.stack([x[s:e].double().T @ dy[s:e].double() for s, e in bounds])
    base_dw = torch.stack([x[s:e].to(dtype).T @ dy[s:e].to(dtype) for s, e in bounds])
    dw = grouped_gemm.grouped_mm_wgrad(x.to(dtype), dy.to(dtype), offsets)
    _assert_close(dw, base_dw, ref_dw, name="wgrad")
    assert torch.count_nonzero(dw[1]) == 0 and torch.count_nonzero(dw[4]) == 0


@pytest.mark.gpu
@pytest.mark.parametrize(
    "num_tokens,num_experts,topk,hidden_size", [(1025, 128, 8, 2000), (97, 16, 1, 4096), (33, 7, 3, 136)]
)
def test_gpu_permute_unpermute_bf16(num_tokens, num_experts, topk, hidden_size):
    """bf16 permute and unpermute, forward and backward, with the default tunables, against float64."""
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    ids, weights = _routing(num_tokens, num_experts, topk, gen)
    hidden = torch.randn(num_tokens, hidden_size, generator=gen, device=DEVICE)
    _check_op(
        lambda h: moe_permute(h, ids, num_experts).rows,
        lambda h: moe_permute_reference(h, ids, num_experts).rows,
        [hidden],
        torch.bfloat16,
    )
    row_index = moe_permute_reference(hidden, ids, num_experts).row_index
    rows = torch.randn(num_tokens * topk, hidden_size, generator=gen, device=DEVICE)
    _check_op(
        lambda r, w: moe_unpermute(r, row_index, w),
        lambda r, w: moe_unpermute_reference(r, row_index, w),
        [rows, weights],
        torch.bfloat16,
    )


@pytest.mark.gpu
def test_gpu_permute_large_matches_reference():
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    ids, _ = _routing(16384, 128, 8, gen)
    hidden = torch.randn(16384, 256, generator=gen, device=DEVICE, dtype=torch.bfloat16)
    fast = moe_permute(hidden, ids, 128)
    ref = moe_permute_reference(hidden, ids, 128)
    for name, f, r in zip(MoEPermutation._fields, fast, ref, strict=True):
        assert torch.equal(f, r), name


@pytest.mark.gpu
def test_gpu_moe_ffn_makes_no_host_sync():
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    ids, weights = _routing(4096, 64, 8, gen)
    hidden = torch.randn(4096, 512, generator=gen, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    gate_up, down = (t.bfloat16().requires_grad_() for t in _expert_weights(64, 512, 256, gen))
    weights.requires_grad_(True)
    grad = torch.randn(4096, 512, generator=gen, device=DEVICE, dtype=torch.bfloat16)
    moe_ffn(hidden, ids, weights, gate_up, down, check_ids=False).backward(grad)  # warm-up: compile the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        moe_ffn(hidden, ids, weights, gate_up, down, check_ids=False).backward(grad)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(gate_up.grad).all()


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9, reason="torch._grouped_mm path: sm90"
)
def test_gpu_torch_grouped_mm_taken_for_qwen3_moe_layout():
    """On Hopper, bf16 expert GEMMs of the HF weight layout go to torch._grouped_mm (all four operand forms)."""
    from veofast.ops import moe as moe_ops

    rows = torch.randn(1000, 2048, device=DEVICE, dtype=torch.bfloat16)
    h = torch.randn(1000, 1536, device=DEVICE, dtype=torch.bfloat16)
    gate_up = torch.randn(8, 1536, 2048, device=DEVICE, dtype=torch.bfloat16)
    down = torch.randn(8, 2048, 768, device=DEVICE, dtype=torch.bfloat16)
    assert moe_ops._torch_grouped_mm_ok(rows, gate_up.transpose(1, 2), out_cols=1536)  # forward
    assert moe_ops._torch_grouped_mm_ok(h[:, :768].contiguous(), down.transpose(1, 2), out_cols=2048)
    assert moe_ops._torch_grouped_mm_ok(rows, down, out_cols=768)  # input gradient through down_proj
    assert moe_ops._torch_grouped_mm_ok(h, rows, out_cols=2048)  # weight gradient of gate_up_proj


@pytest.mark.gpu
def test_gpu_moe_ffn_under_inductor_matches_eager():
    """The Triton path behind torch.compile(dynamic=True) with inductor, bf16, forward and backward, for three
    token counts (traced, it did not finish compiling on an H200 at 37 tokens)."""
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    gate_up, down = (t.bfloat16().requires_grad_() for t in _expert_weights(8, 256, 128, gen))

    def layer(h, ids, w):
        return moe_ffn(h, ids, w, gate_up, down, check_ids=False)

    compiled = torch.compile(layer, dynamic=True)
    for num_tokens in (37, 128, 301):
        ids, weights = _routing(num_tokens, 8, 2, gen)
        hidden = torch.randn(num_tokens, 256, generator=gen, device=DEVICE, dtype=torch.bfloat16)
        results = []
        for fn in (layer, compiled):
            h = hidden.clone().requires_grad_()
            gate_up.grad = down.grad = None
            out = fn(h, ids, weights.bfloat16())
            out.float().square().sum().backward()
            results.append([out, h.grad, gate_up.grad, down.grad])
        for got, want in zip(results[1], results[0], strict=True):
            assert torch.equal(got, want)
