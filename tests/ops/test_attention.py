"""Tests of packed varlen attention.

- The reference against a dense, block-diagonal float64 definition written independently here.
- The Triton path (the interpreter on CPU in fp32/fp16, tiny shapes; the GPU in bf16/fp16 at realistic sizes)
  against the float64 per-document reference, fwd and bwd: |triton - ref64| <= 2 |torch_same_dtype - ref64| +
  floor, where torch_same_dtype is the reference (per-document SDPA) run in the kernel's dtype.
- Input checks raise ValueError naming the argument, before any kernel runs.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from veofast.ops.attention import varlen_attention, varlen_attention_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Floors of the error bound, relative to max(1, max |ref64|).
FLOOR = {torch.float32: 2e-5, torch.float16: 1e-3, torch.bfloat16: 4e-3}


def _cu(lengths: list[int], device: str = "cpu") -> torch.Tensor:
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)


def _inputs(lens_q, lens_k, hq, hk, d, dtype, device, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(sum(lens_q), hq, d, generator=gen)
    k = torch.randn(sum(lens_k), hk, d, generator=gen)
    v = torch.randn(sum(lens_k), hk, d, generator=gen)
    dout = torch.randn(sum(lens_q), hq, d, generator=gen)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v, dout)]


def _fwd_bwd(fn, q, k, v, dout, *args, **kwargs):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, *args, **kwargs)
    return (out, *torch.autograd.grad(out, (q, k, v), dout))


def _dense(q, k, v, cu_q, cu_k, *, causal, window_size):
    """Float64 attention over the whole packed sequence with an explicit (total_q, total_k) mask."""
    doc_q = torch.repeat_interleave(torch.arange(len(cu_q) - 1), (cu_q[1:] - cu_q[:-1]).long())
    doc_k = torch.repeat_interleave(torch.arange(len(cu_k) - 1), (cu_k[1:] - cu_k[:-1]).long())
    pos_q = torch.arange(q.shape[0]) - cu_q[doc_q]
    pos_k = torch.arange(k.shape[0]) - cu_k[doc_k]
    off = (cu_k[1:] - cu_k[:-1] - (cu_q[1:] - cu_q[:-1]))[doc_q]  # bottom-right alignment
    i, j = (pos_q + off)[:, None], pos_k[None, :]
    mask = doc_q[:, None] == doc_k[None, :]
    left, right = window_size[0], 0 if causal else window_size[1]
    if right >= 0:
        mask &= j <= i + right
    if left >= 0:
        mask &= j >= i - left
    group = q.shape[1] // k.shape[1]
    kk, vv = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), kk) * q.shape[-1] ** -0.5
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1).nan_to_num(0.0)
    return torch.einsum("hqk,khd->qhd", probs, vv)


def _assert_bound(name, fast, low, ref, dtype, factor=2.0):
    scale = max(1.0, ref.abs().max().item())
    err_fast = (fast.double() - ref).abs().max().item()
    err_low = (low.double() - ref).abs().max().item()
    bound = factor * err_low + FLOOR[dtype] * scale
    assert err_fast <= bound, f"{name}: error {err_fast:.3g} > {bound:.3g} (torch {dtype} error {err_low:.3g})"


def _launchers(q, k, v, dout, cu_q, cu_k, max_q, max_k, *, causal, window_size, softmax_scale, configs):
    """out, dq, dk, dv from the kernel launchers with explicit (fwd, dq, dkdv) configs."""
    from veofast.kernels import attention as ka

    window = dict(softmax_scale=softmax_scale or q.shape[-1] ** -0.5, window_left=window_size[0])
    window["window_right"] = 0 if causal else window_size[1]
    fwd, dq, dkdv = (ka.Config(*c) for c in configs)
    out, lse = ka.varlen_attention_fwd(q, k, v, cu_q, cu_k, max_q, max_k, config=fwd, **window)
    grads = ka.varlen_attention_bwd(
        dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, dq_config=dq, dkdv_config=dkdv, **window
    )
    return (out, *grads)


def _check_against_reference(
    lens_q, lens_k, hq, hk, d, dtype, *, causal, window_size=(-1, -1), softmax_scale=None, configs=None, device=DEVICE
):
    """Triton (the public op, or the launchers with ``configs``) against the float64 reference, fwd and bwd."""
    q, k, v, dout = _inputs(lens_q, lens_k, hq, hk, d, dtype, device)
    cu_q, cu_k = _cu(lens_q, device), _cu(lens_k, device)
    args = (cu_q, cu_k, max(lens_q), max(lens_k))
    kw = dict(causal=causal, window_size=window_size, softmax_scale=softmax_scale)
    if configs is None:
        fast = _fwd_bwd(varlen_attention, q, k, v, dout, *args, backend="triton", **kw)
    else:
        fast = _launchers(q, k, v, dout, *args, configs=configs, **kw)
    low = _fwd_bwd(varlen_attention_reference, q, k, v, dout, *args, **kw)
    ref = _fwd_bwd(varlen_attention_reference, *(t.double() for t in (q, k, v, dout)), *args, **kw)
    assert fast[0].is_contiguous()  # as the torch backend's output, also for head dims that run padded
    for name, f, lo, r in zip(("out", "dq", "dk", "dv"), fast, low, ref, strict=True):
        assert f.dtype == dtype and f.shape == r.shape
        _assert_bound(name, f, lo, r, dtype)


# ----------------------------------------------------------------------------------------- reference definition
@pytest.mark.parametrize(
    "lens_q, lens_k, causal, window_size",
    [
        ([1, 17, 0, 9], [1, 17, 0, 9], True, (-1, -1)),
        ([5, 0, 12], [9, 3, 4], True, (-1, -1)),  # bottom-right: more keys, and more queries than keys
        ([5, 0, 12], [9, 3, 4], False, (-1, -1)),
        ([13, 8], [13, 8], True, (3, -1)),
        ([13, 8], [10, 8], False, (2, 4)),
    ],
)
def test_reference_matches_dense_definition(lens_q, lens_k, causal, window_size):
    q, k, v, _ = _inputs(lens_q, lens_k, 4, 2, 8, torch.float64, "cpu")
    got = varlen_attention_reference(
        q, k, v, _cu(lens_q), _cu(lens_k), max(lens_q), max(lens_k), causal=causal, window_size=window_size
    )
    want = _dense(q, k, v, _cu(lens_q), _cu(lens_k), causal=causal, window_size=window_size)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------- triton kernels (interpreter on CPU)
@pytest.mark.parametrize(
    "lens_q, lens_k, hq, hk, d, dtype, causal, window_size",
    [
        pytest.param([1, 17, 0, 129], None, 4, 1, 16, torch.float32, True, (-1, -1), id="causal-gqa4-1-17-0-129"),
        pytest.param([97, 0, 128], None, 1, 1, 32, torch.float32, False, (-1, -1), id="full-97-0-128"),
        pytest.param([1, 70], None, 2, 1, 16, torch.float32, True, (8, -1), id="causal-window8"),
        pytest.param([33, 0, 50], None, 2, 2, 16, torch.float32, False, (5, 9), id="window-5-9"),
        pytest.param([5, 0, 25], [20, 3, 17], 2, 1, 16, torch.float32, True, (-1, -1), id="bottom-right"),
        pytest.param([17, 40], None, 2, 2, 32, torch.float16, True, (-1, -1), id="fp16-causal"),
    ],
)
def test_triton_matches_reference(lens_q, lens_k, hq, hk, d, dtype, causal, window_size):
    _check_against_reference(lens_q, lens_k or lens_q, hq, hk, d, dtype, causal=causal, window_size=window_size)


# (block_m, block_n, num_warps, num_stages, tma, split_mask, tile_store, q_rows) of the fwd, dq and dkdv kernels:
# every load path, loop structure, score orientation and store path, block shapes that do not divide the documents.
@pytest.mark.parametrize(
    "configs, causal, window_size",
    [
        pytest.param([(16, 32, 4, 1, True), (32, 16, 4, 1, True), (16, 32, 4, 1, True)], True, (-1, -1), id="tma"),
        pytest.param(
            [(32, 16, 4, 1, True), (16, 16, 4, 1), (32, 16, 4, 1, True, False)], False, (6, 3), id="tma-window"
        ),
        pytest.param([(16, 16, 4, 1), (16, 32, 4, 1), (16, 16, 4, 1, False, False)], False, (9, -1), id="onemask-left"),
        pytest.param(
            [(16, 32, 4, 1, True, True, True), (32, 16, 4, 1, True), (16, 32, 4, 1, True, True, True)],
            True,
            (-1, -1),
            id="tilestore",
        ),
        pytest.param(
            [(32, 16, 4, 1, False, True, True), (16, 16, 4, 1), (32, 16, 4, 1, False, False, True)],
            False,
            (2, 5),
            id="tilestore-ptr",
        ),
        pytest.param(
            [(16, 32, 4, 1, True), (32, 16, 4, 1, True), (16, 32, 4, 1, True, True, False, True)],
            True,
            (-1, -1),
            id="qrows",
        ),
        pytest.param(
            [(16, 16, 4, 1), (16, 16, 4, 1), (32, 16, 4, 1, False, False, False, True)],
            False,
            (6, 3),
            id="qrows-ptr-window",
        ),
        pytest.param(  # a register cap (maxnreg) on each kernel
            [
                (16, 16, 4, 1, False, True, False, False, 128),
                (16, 32, 4, 1, True, True, False, False, 168),
                (16, 16, 4, 1, True, True, False, True, 128),
            ],
            True,
            (-1, -1),
            id="register-cap",
        ),
    ],
)
def test_kernel_configs_match_reference(configs, causal, window_size):
    lens = [1, 17, 0, 45]
    _check_against_reference(
        lens, lens, 4, 2, 16, torch.float32, causal=causal, window_size=window_size, configs=configs
    )


@pytest.mark.parametrize("d, causal, window_size", [(24, True, (-1, -1)), (40, False, (5, 2)), (9, True, (-1, -1))])
def test_head_dims_between_kernel_sizes_run_padded(d, causal, window_size):
    """Head dims the kernels are not built for run zero-padded to the next size; the softmax scale stays d^-0.5."""
    _check_against_reference(
        [1, 17, 0, 30], [1, 17, 0, 30], 4, 2, d, torch.float32, causal=causal, window_size=window_size
    )


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("lens_q, lens_k", [([0], [0]), ([3, 2], [0, 0])])
def test_output_without_keys_is_differentiable(backend, lens_q, lens_k):
    """No tokens, or no document with keys: the zero output is still in q's graph (zero gradient, no error)."""
    q, k, v, dout = _inputs(lens_q, lens_k, 2, 1, 16, torch.float32, "cpu")
    q.requires_grad_()
    out = varlen_attention(q, k, v, _cu(lens_q), _cu(lens_k), max(lens_q), max(lens_k), backend=backend)
    (grad_q,) = torch.autograd.grad(out, q, dout)
    assert out.shape == q.shape and not out.any() and not grad_q.any()


def test_negative_softmax_scale():
    _check_against_reference([7, 30], [7, 30], 2, 1, 16, torch.float32, causal=True, softmax_scale=-0.3)


@pytest.mark.parametrize("block, reverse", [(16, False), (32, True)])
def test_tile_table_lists_every_tile_once_heaviest_first(block, reverse):
    """The schedule kernel's table: each (document, block) once, ranks non-increasing, the rest of the slots empty."""
    from veofast.kernels.attention import _tile_table

    lens_q, lens_k = [5, 0, 70, 16, 1, 33], [6, 2, 70, 15, 0, 40]
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    tiles, num_slots = _tile_table(cu_k, cu_q, cu_k, sum(lens_k), max(lens_k), block, reverse)
    blocks, q_starts, q_lens, k_starts, k_lens = tiles.tolist()
    want = {
        (b, cu_q[d].item(), lens_q[d], cu_k[d].item(), lens_k[d])
        for d in range(len(lens_k))
        for b in range(-(-lens_k[d] // block))
    }
    listed = [t for t in zip(blocks, q_starts, q_lens, k_starts, k_lens, strict=True) if t[0] >= 0]
    assert sorted(listed) == sorted(want) and len(listed) == len(want)
    assert all(b == -1 for b in blocks[len(listed) :])
    ranks = [b if not reverse else -(-n // block) - 1 - b for b, _, _, _, n in listed]
    assert ranks == sorted(ranks, reverse=True)


def test_tile_tables_are_reused_until_cu_seqlens_change():
    """Layers passing the same cu_seqlens share one table; a new tensor or an in-place change of the same one gets a
    fresh table, and the op's results stay those of the new documents."""
    from veofast.kernels.attention import _tile_table

    cu = _cu([5, 30, 12])
    first, _ = _tile_table(cu, cu, cu, 47, 30, 16, True)
    assert _tile_table(cu, cu, cu, 47, 30, 16, True)[0] is first
    assert _tile_table(cu, cu, cu, 47, 30, 32, True)[0] is not first
    assert _tile_table(cu.clone(), cu, cu, 47, 30, 16, True)[0] is not first

    lens, lens_after = [9, 30, 8], [20, 7, 20]
    q, k, v, dout = _inputs(lens, lens, 2, 1, 16, torch.float32, DEVICE)
    cu = _cu(lens, DEVICE)
    varlen_attention(q, k, v, cu, cu, 30, 30, backend="triton")
    cu.copy_(_cu(lens_after, DEVICE))  # the same tensor, new documents
    got = _fwd_bwd(varlen_attention, q, k, v, dout, cu, cu, 30, 30, backend="triton")
    ref = _fwd_bwd(varlen_attention_reference, *(t.double() for t in (q, k, v, dout)), cu, cu, 30, 30)
    for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref, strict=True):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-4, msg=name)


def test_auto_backend_on_cpu_is_the_reference():
    q, k, v, _ = _inputs([3, 4], [3, 4], 2, 1, 24, torch.float32, "cpu")  # head_dim 24: reference only
    out = varlen_attention(q, k, v, _cu([3, 4]), _cu([3, 4]), 4, 4)
    torch.testing.assert_close(out, varlen_attention_reference(q, k, v, _cu([3, 4]), _cu([3, 4]), 4, 4))


def test_custom_op_registration():
    """Schema, fake (meta) implementation and autograd registration: what torch.compile relies on."""
    from veofast.ops.attention import _fwd_op

    q, k, v, _ = _inputs([3, 5], [3, 5], 2, 1, 16, torch.float32, "cpu")
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    torch.library.opcheck(
        _fwd_op,
        (q, k, v, _cu([3, 5]), _cu([3, 5]), 5, 5, 0.25, -1, 0),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )


def test_torch_compile_fullgraph():
    """Dynamo traces the public function in one graph (custom ops + fake impls); aot_eager keeps it cheap on CPU."""
    lens = [3, 9]
    q, k, v, dout = _inputs(lens, lens, 2, 1, 16, torch.float32, "cpu")
    cu = _cu(lens)

    def layer(q, k, v):
        return varlen_attention(q * 1.5, k, v, cu, cu, 9, 9, backend="triton")

    eager = _fwd_bwd(layer, q, k, v, dout)
    compiled = _fwd_bwd(torch.compile(layer, fullgraph=True, backend="aot_eager"), q, k, v, dout)
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------------------------- input checks
def _bad_call(**overrides):
    q, k, v, _ = _inputs([3, 4], [3, 4], 4, 2, 16, torch.float32, "cpu")
    args = dict(q=q, k=k, v=v, cu_seqlens_q=_cu([3, 4]), cu_seqlens_k=_cu([3, 4]), max_seqlen_q=4, max_seqlen_k=4)
    args.update(overrides)
    backend = args.pop("backend", "triton")
    return varlen_attention(**args, backend=backend)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(cu_seqlens_q=torch.tensor([0, 5, 3], dtype=torch.int32)), "cu_seqlens_q must be non-decreasing"),
        (dict(cu_seqlens_k=torch.tensor([0, 3, 6], dtype=torch.int32)), r"cu_seqlens_k\[-1\]"),
        (dict(cu_seqlens_q=torch.tensor([1, 3, 7], dtype=torch.int32)), "cu_seqlens_q must start at 0"),
        (dict(cu_seqlens_q=torch.tensor([0, 3, 7])), "cu_seqlens_q must be a 1-D int32"),
        (dict(cu_seqlens_k=torch.tensor([0, 7], dtype=torch.int32)), "same length"),
        (dict(max_seqlen_q=3), "max_seqlen_q"),
        (dict(max_seqlen_k=4.0), "max_seqlen_k"),
        (dict(k=torch.randn(7, 3, 16), v=torch.randn(7, 3, 16)), "num_kv_heads"),
        (dict(v=torch.randn(7, 2, 8)), "k and v"),
        (dict(q=torch.randn(7, 4, 8)), "head_dim"),
        (dict(q=torch.randn(7, 4, 0), k=torch.randn(7, 2, 0), v=torch.randn(7, 2, 0)), "head_dim"),
        (dict(q=torch.randn(7, 16)), "q must be a 3-D"),
        (dict(window_size=(-2, 0)), "window_size"),
        (dict(softmax_scale=float("nan")), "softmax_scale"),
    ],
)
def test_bad_inputs_raise(overrides, match, backend):
    with pytest.raises(ValueError, match=match):
        _bad_call(backend=backend, **overrides)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(q=torch.randn(7, 4, 264), k=torch.randn(7, 2, 264), v=torch.randn(7, 2, 264)), "head_dim 264"),
        (
            dict(q=torch.randn(7, 4, 16).double(), k=torch.randn(7, 2, 16).double(), v=torch.randn(7, 2, 16).double()),
            "float64",
        ),
    ],
)
def test_triton_rejects_unsupported(overrides, match):
    with pytest.raises(ValueError, match=match):
        _bad_call(**overrides)


def test_unknown_backend_raises():
    with pytest.raises(ValueError, match="backend"):
        _bad_call(backend="cudnn")


# ----------------------------------------------------------------------------------------------------------- GPU
# The GPU tests use the pinned configs (kernels/attention.py CONFIGS): each (dtype, head dim class, mask flags)
# below is one compile of each kernel, so the set stays small; fp16 shares the bf16 code and configs.
GPU_LENS = [1, 17, 97, 128, 0, 129, 1025, 300]


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("hq, hk", [(8, 8), (8, 2), (8, 1)])
def test_gpu_causal(d, hq, hk):
    _check_against_reference(GPU_LENS, GPU_LENS, hq, hk, d, torch.bfloat16, causal=True)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [16, 32])
def test_gpu_small_head_dims(d):
    """Head dims 16 and 32 run the 64 class's tile configs with narrower tiles."""
    _check_against_reference(GPU_LENS, GPU_LENS, 8, 2, d, torch.bfloat16, causal=True)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [80, 96, 192])
def test_gpu_padded_head_dims(d):
    """Phi-3's 96, and 80 and 192: zero-padded to the 128 and 256 kernels."""
    _check_against_reference(GPU_LENS, GPU_LENS, 8, 2, d, torch.bfloat16, causal=True)


@pytest.mark.gpu
def test_gpu_fp16():
    _check_against_reference(GPU_LENS, GPU_LENS, 8, 2, 128, torch.float16, causal=True)


@pytest.mark.gpu
def test_gpu_pointer_loads():
    """Heads that are not contiguous within a token (a slice of a wider buffer) rule out TMA: the pointer path."""
    lens = [1, 200, 129, 700]
    q, k, v, dout = (
        torch.cat([t, t], dim=-1)[..., :128] for t in _inputs(lens, lens, 8, 2, 128, torch.bfloat16, "cuda")
    )
    cu = _cu(lens, "cuda")
    fast = _fwd_bwd(varlen_attention, q, k, v, dout, cu, cu, 700, 700, backend="triton")
    ref = _fwd_bwd(varlen_attention_reference, *(t.double() for t in (q, k, v, dout)), cu, cu, 700, 700)
    low = _fwd_bwd(varlen_attention_reference, q, k, v, dout, cu, cu, 700, 700)
    for name, f, lo, r in zip(("out", "dq", "dk", "dv"), fast, low, ref, strict=True):
        _assert_bound(name, f, lo, r, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "lens_k, causal, window_size",
    [
        (None, False, (-1, -1)),
        (None, True, (200, -1)),
        (None, False, (64, 32)),
        ([5, 40, 90, 128, 7, 200, 1000, 301], True, (-1, -1)),
        ([5, 40, 90, 128, 7, 200, 1000, 301], False, (-1, -1)),
    ],
    ids=["full", "causal-window200", "window-64-32", "bottom-right-causal", "bottom-right-full"],
)
def test_gpu_masks(lens_k, causal, window_size):
    lens_q, lens_k = GPU_LENS, lens_k or GPU_LENS
    _check_against_reference(lens_q, lens_k, 8, 2, 128, torch.bfloat16, causal=causal, window_size=window_size)


@pytest.mark.gpu
@pytest.mark.parametrize("where", ["q", "k", "v", "dout"])
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_nonfinite_reaches_no_document_out_of_tile_reach(where, causal):
    """bf16 on the TMA path: a NaN and an inf in document 2's q, k, v or output gradient. The documented limit
    (``varlen_attention``): only documents ending within one tile (128 tokens) before the token may change; here
    document 1 (tokens 37..236). Documents 0, 3 and 4 stay bitwise unchanged, in outputs and gradients."""
    lens = [37, 200, 129, 64, 300]
    inputs = _inputs(lens, lens, 8, 2, 128, torch.bfloat16, "cuda", seed=3)
    cu = _cu(lens, "cuda")
    clean = _fwd_bwd(varlen_attention, *inputs, cu, cu, 300, 300, causal=causal, backend="triton")
    bad = [t.clone() for t in inputs]
    poisoned = bad[["q", "k", "v", "dout"].index(where)]
    poisoned[237 + 5, 0, 3] = float("nan")  # document 2 is tokens 237..365
    poisoned[237 + 100, 1, 7] = float("inf")
    got = _fwd_bwd(varlen_attention, *bad, cu, cu, 300, 300, causal=causal, backend="triton")
    out_of_reach = torch.ones(sum(lens), dtype=torch.bool, device="cuda")
    out_of_reach[37:366] = False
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, clean, strict=True):
        assert torch.equal(a[out_of_reach], b[out_of_reach]), f"{name}: a document out of reach changed"


@pytest.mark.gpu
def test_gpu_fp32():
    _check_against_reference([1, 97, 300], [1, 97, 300], 4, 2, 64, torch.float32, causal=True)


@pytest.mark.gpu
def test_gpu_anchor_mix():
    """32 query / 8 KV heads, head_dim 128, bf16, documents 64..4096 packed into 16384 tokens."""
    lens = [4096, 64, 1500, 3000, 777, 2048, 4096, 803]
    _check_against_reference(lens, lens, 32, 8, 128, torch.bfloat16, causal=True)


@pytest.mark.gpu
def test_gpu_torch_compile():
    lens = [1, 200, 129, 700]
    q, k, v, dout = _inputs(lens, lens, 8, 2, 128, torch.bfloat16, "cuda")
    cu = _cu(lens, "cuda")

    def layer(q, k, v):
        return varlen_attention(q * 1.5, k, v, cu, cu, max(lens), max(lens), causal=True)

    eager = _fwd_bwd(layer, q, k, v, dout)
    compiled = _fwd_bwd(torch.compile(layer, fullgraph=True), q, k, v, dout)
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
def test_gpu_check_inputs_reads_cu_seqlens():
    q, k, v, _ = _inputs([3, 4], [3, 4], 4, 2, 64, torch.bfloat16, "cuda")
    bad = torch.tensor([0, 5, 3], dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match="non-decreasing"):
        varlen_attention(q, k, v, bad, bad, 5, 5, check_inputs=True)
