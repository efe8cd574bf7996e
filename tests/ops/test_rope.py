"""apply_rotary: Triton path (interpreter on CPU, bf16 on GPU) and torch path against a float64 reference."""

import sys

import pytest
import torch

from veofast.ops.rope import apply_rotary, apply_rotary_reference

# Error floor per dtype, relative to the largest reference value.
FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def assert_close(name, fast, ref_dtype, ref64, dtype, k=2.0):
    """|fast - ref64| <= k * |ref_dtype - ref64| + floor, in the max norm."""
    err_fast = (fast.double() - ref64).abs().max().item()
    err_ref = (ref_dtype.double() - ref64).abs().max().item()
    bound = k * err_ref + FLOOR[dtype] * max(1.0, ref64.abs().max().item())
    assert err_fast <= bound, f"{name}: error {err_fast:.3g} > bound {bound:.3g} (torch {dtype} error {err_ref:.3g})"


def inv_freq_for(head_dim, device, base=10000.0):
    return 1.0 / base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)


def packed_positions(n_tokens, gen, device, max_position=4096):
    """Positions of packed documents (restarting at 0), then shuffled, with a few large positions mixed in."""
    positions, start = [], 0
    while start < n_tokens:
        length = int(torch.randint(1, 40, (1,), generator=gen))
        positions.append(torch.arange(min(length, n_tokens - start)))
        start += length
    pos = torch.cat(positions)[torch.randperm(n_tokens, generator=gen)]
    large = torch.arange(0, n_tokens, max(1, n_tokens // 5))
    pos[large] = torch.randint(0, max_position, (len(large),), generator=gen)
    return pos.to(device)


def run(q, k, pos, inv_freq, grads, scaling, backend, cast=None, inplace=False):
    leaves = [t.detach().to(cast or t.dtype).requires_grad_() for t in (q, k)]
    if backend == "reference":
        outs = apply_rotary_reference(*leaves, pos, inv_freq, scaling=scaling)
    else:  # in place: on non-leaf copies (``1 * x``), as the models rotate their projection outputs
        operands = [1 * t for t in leaves] if inplace else leaves
        outs = apply_rotary(*operands, pos, inv_freq, scaling=scaling, inplace=inplace, backend=backend)
    loss = sum((o * g.to(o.dtype)).sum() for o, g in zip(outs, grads, strict=True))
    return outs, torch.autograd.grad(loss, leaves)


def check_against_reference(
    n_tokens, n_q, n_k, head_dim, dtype, scaling, device, backend, *, fused_qkv=False, inplace=False
):
    seed = n_tokens * 1000 + n_q * 100 + head_dim
    gen = torch.Generator(device=device).manual_seed(seed)
    randn = lambda *s: torch.randn(*s, generator=gen, device=device).to(dtype)
    if fused_qkv:  # q and k as strided views of one projection output, like a fused qkv linear gives them
        qkv = randn(n_tokens, (n_q + 2 * n_k) * head_dim)
        q = qkv[:, : n_q * head_dim].view(n_tokens, n_q, head_dim)
        k = qkv[:, n_q * head_dim : (n_q + n_k) * head_dim].view(n_tokens, n_k, head_dim)
    else:
        q, k = randn(n_tokens, n_q, head_dim), randn(n_tokens, n_k, head_dim)
    pos = packed_positions(n_tokens, torch.Generator().manual_seed(seed), device)
    inv_freq = inv_freq_for(head_dim, device)
    grads = [randn(n_tokens, n_q, head_dim), randn(n_tokens, n_k, head_dim)]

    outs, dgrads = run(q, k, pos, inv_freq, grads, scaling, backend, inplace=inplace)
    outs_ref, dgrads_ref = run(q, k, pos, inv_freq, grads, scaling, "reference")
    outs64, dgrads64 = run(q, k, pos, inv_freq, grads, scaling, "reference", cast=torch.float64)
    for name, a, b, c in zip(
        ["q", "k", "dq", "dk"], outs + dgrads, outs_ref + dgrads_ref, outs64 + dgrads64, strict=True
    ):
        assert a.dtype == dtype and a.shape == c.shape
        assert_close(name, a, b, c, dtype)


@pytest.mark.parametrize(
    "n_tokens, n_q, n_k, head_dim",
    [(1, 1, 1, 2), (13, 4, 2, 16), (6, 3, 1, 64), (3, 2, 2, 128), (5, 3, 2, 96), (7, 1, 3, 16)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("scaling", [1.0, 0.75])
def test_triton_interpreter_matches_reference(n_tokens, n_q, n_k, head_dim, dtype, scaling):
    check_against_reference(n_tokens, n_q, n_k, head_dim, dtype, scaling, "cpu", "triton")


def test_triton_interpreter_97_tokens():
    check_against_reference(97, 2, 1, 16, torch.float32, 0.75, "cpu", "triton")


def test_triton_interpreter_strided_inputs():
    check_against_reference(11, 4, 2, 32, torch.float32, 1.0, "cpu", "triton", fused_qkv=True)


def check_kernel_config(config, n_tokens, n_q, n_k, head_dim):
    """rotary() at ``config``, forward and inverse (the backward), against float64 (fp32 inputs)."""
    from veofast.kernels.rope import rotary

    gen = torch.Generator().manual_seed(n_tokens * 100 + head_dim)
    q, k = torch.randn(n_tokens, n_q, head_dim, generator=gen), torch.randn(n_tokens, n_k, head_dim, generator=gen)
    pos, inv_freq = packed_positions(n_tokens, gen, "cpu"), inv_freq_for(head_dim, "cpu")
    q64, k64 = q.double().requires_grad_(), k.double().requires_grad_()
    outs64 = apply_rotary_reference(q64, k64, pos, inv_freq, scaling=0.75)
    for got, want in zip(rotary(q, k, pos, inv_freq, 0.75, False, config=config), outs64, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5, msg=lambda m: f"{config}: {m}")
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    grads64 = torch.autograd.grad(outs64, [q64, k64], [dq.double(), dk.double()])
    for got, want in zip(rotary(dq, dk, pos, inv_freq, 0.75, True, config=config), grads64, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5, msg=lambda m: f"{config} inverse: {m}")


@pytest.mark.parametrize(
    "config",
    [
        {"tokens": 4, "heads": 2, "warps": 2, "stages": 2},  # partial token block, head count not a multiple
        {"tokens": 1, "heads": 8, "warps": 4, "stages": 1},  # one token per program, more head slots than heads
        # head steps dealt to programs: q steps 0-2, k steps 3-4 over 3 programs (2, 2 and 1 steps each)
        {"tokens": 4, "heads": 2, "warps": 1, "stages": 2, "groups": 3},
        {"tokens": 2, "heads": 1, "warps": 1, "stages": 1, "groups": 64},  # one head per program, capped at 8
    ],
)
def test_triton_interpreter_kernel_configs(config):
    """The launcher at configs other than the pinned ones, both directions, vs float64."""
    check_kernel_config(config, 13, 5, 3, 32)


@pytest.mark.parametrize("head_dim", [64, 96, 128])
def test_triton_interpreter_sweep_candidates(head_dim):
    """Every config that the GPU sweep times (``candidates()``) at an odd size, both directions, vs float64. Warps
    and stages do not change what the interpreter runs: one config per (tokens, heads, groups)."""
    from veofast.kernels.rope import candidates

    tiles = {(c["tokens"], c["heads"], c.get("groups", 1)): c for c in candidates(head_dim)}
    for config in tiles.values():
        check_kernel_config(config, 23, 5, 3, head_dim)


def test_rotation_by_position_is_relative():
    """<rope(q, m), rope(k, n)> depends only on m - n: the property RoPE exists for."""
    q, k = torch.randn(1, 1, 32, dtype=torch.float64), torch.randn(1, 1, 32, dtype=torch.float64)
    inv_freq = inv_freq_for(32, "cpu")
    dots = []
    for m, n in [(5, 2), (103, 100), (3, 0)]:
        q_rot, _ = apply_rotary(q, k, torch.tensor([m]), inv_freq, backend="torch")
        _, k_rot = apply_rotary(q, k, torch.tensor([n]), inv_freq, backend="torch")
        dots.append((q_rot * k_rot).sum().item())
    assert max(dots) - min(dots) < 1e-4


def test_torch_backend_is_reference():
    q, k, pos = torch.randn(6, 4, 16), torch.randn(6, 2, 16), torch.tensor([0, 1, 2, 0, 1, 0])
    inv_freq = inv_freq_for(16, "cpu")
    out = apply_rotary(q, k, pos, inv_freq, scaling=0.5, backend="torch")
    ref = apply_rotary_reference(q, k, pos, inv_freq, scaling=0.5)
    assert all(torch.equal(a, b) for a, b in zip(out, ref, strict=True))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compiles(backend):
    q, k = torch.randn(6, 4, 16, requires_grad=True), torch.randn(6, 2, 16, requires_grad=True)
    pos, inv_freq = torch.tensor([0, 1, 2, 0, 1, 0]), inv_freq_for(16, "cpu")

    def step(q, k):
        q_rot, k_rot = apply_rotary(q, k, pos, inv_freq, scaling=0.9, backend=backend)
        return (q_rot[:, :2] * k_rot).sum()

    eager = torch.autograd.grad(step(q, k), [q, k])
    compiled = torch.autograd.grad(torch.compile(step, backend="aot_eager", fullgraph=True)(q, k), [q, k])
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(a, b)


def _rope_operands(q_leaf, k_leaf, layout):
    """Non-leaf q, k computed from the leaves (as projection outputs are) in ``layout``: fresh tensors, (T, heads, d)
    views of one fused qkv output (the models' ``proj(x).view(...)``), or with head_dim not the unit-stride axis (the
    in-place path then rotates a copy and writes it back)."""
    n_tokens, n_q, d = q_leaf.shape
    if layout == "fused_qkv_views":
        fused = torch.cat([q_leaf.reshape(n_tokens, -1), k_leaf.reshape(n_tokens, -1)], dim=1) * 1.5
        return fused[:, : n_q * d].view(n_tokens, n_q, d), fused[:, n_q * d :].view(n_tokens, -1, d)
    q, k = q_leaf * 1.5, k_leaf - 0.25
    if layout == "dim_strided":
        return q.transpose(0, 2).contiguous().transpose(0, 2), k.transpose(0, 2).contiguous().transpose(0, 2)
    return q, k


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("layout", ["fresh", "fused_qkv_views", "dim_strided"])
@pytest.mark.parametrize("compiled", [False, True])
def test_inplace_matches_out_of_place(backend, layout, compiled):
    """inplace=True returns q and k themselves holding the out-of-place result; gradients through it match too,
    eager and compiled."""
    gen = torch.Generator().manual_seed(7)
    q0, k0 = torch.randn(9, 4, 16, generator=gen), torch.randn(9, 2, 16, generator=gen)
    pos, inv_freq = packed_positions(9, torch.Generator().manual_seed(3), "cpu"), inv_freq_for(16, "cpu")
    grads = [torch.randn(9, 4, 16, generator=gen), torch.randn(9, 2, 16, generator=gen)]

    def step(q_leaf, k_leaf, inplace):
        q, k = _rope_operands(q_leaf, k_leaf, layout)
        q_out, k_out = apply_rotary(q, k, pos, inv_freq, scaling=0.8, inplace=inplace, backend=backend)
        assert (q_out is q and k_out is k) == inplace
        return q_out, k_out, (q_out * grads[0]).sum() + (k_out * grads[1]).sum()

    leaves = [t.clone().requires_grad_() for t in (q0, k0)]
    want = step(*leaves, False)
    want_grads = torch.autograd.grad(want[2], leaves)
    run = torch.compile(step, backend="aot_eager", fullgraph=True) if compiled else step
    got = run(*leaves, True)
    got_grads = torch.autograd.grad(got[2], leaves)
    for a, b in zip(got[:2] + got_grads, want[:2] + want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("leaf", ["q", "k"])
def test_inplace_on_a_leaf_that_requires_grad_raises_before_rotating(backend, leaf):
    """A ValueError before anything is written: q and k keep their values (autograd's own error came after the
    kernel had rotated both, or on the torch path q alone)."""
    q, k = torch.randn(3, 2, 8), torch.randn(3, 1, 8)
    (q if leaf == "q" else k).requires_grad_()
    before = q.detach().clone(), k.detach().clone()
    with pytest.raises(ValueError, match=f"{leaf} must not be a leaf that requires grad"):
        apply_rotary(q, k, torch.arange(3), inv_freq_for(8, "cpu"), inplace=True, backend=backend)
    assert torch.equal(q.detach(), before[0]) and torch.equal(k.detach(), before[1])


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("saved", ["q", "k"])
def test_inplace_on_a_tensor_saved_for_backward_is_detected(backend, saved):
    """Autograd's version check sees the in-place rotation of q and of k: a backward that needs their old values
    raises instead of silently using the rotated ones."""
    q_leaf, k_leaf = torch.randn(3, 2, 8, requires_grad=True), torch.randn(3, 1, 8, requires_grad=True)
    q, k = q_leaf * 1.0, k_leaf * 1.0
    uses_old = (q if saved == "q" else k).pow(2).sum()  # pow saves its input
    apply_rotary(q, k, torch.arange(3), inv_freq_for(8, "cpu"), inplace=True, backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        uses_old.backward()


Q, K, POS, FREQ = torch.ones(4, 2, 8), torch.ones(4, 1, 8), torch.arange(4), inv_freq_for(8, "cpu")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(q=torch.ones(4, 8)), "q must be a floating tensor"),
        (dict(q=torch.ones(4, 2, 8, dtype=torch.int32)), "q must be a floating tensor"),
        (dict(k=torch.ones(3, 1, 8)), "k must have shape"),
        (dict(k=torch.ones(4, 1, 6)), "k must have shape"),
        (dict(k=torch.ones(4, 1, 8, dtype=torch.float16)), "k must match q's dtype"),
        (dict(q=torch.ones(4, 2, 7), k=torch.ones(4, 1, 7)), "head_dim .* must be even"),
        (dict(position_ids=torch.arange(4).float()), "position_ids must be an int32/int64"),
        (dict(position_ids=torch.arange(4)[None]), "position_ids must be an int32/int64"),
        (dict(position_ids=torch.arange(5)), "position_ids must be an int32/int64"),
        (dict(inv_freq=FREQ[:3]), "inv_freq must be a float32"),
        (dict(inv_freq=FREQ.bfloat16()), "inv_freq must be a float32"),
        (dict(scaling="1"), "scaling must be a float"),
        (dict(inplace=1), "inplace must be a bool"),
        (dict(k=Q, inplace=True), "must be different tensors"),
        (dict(backend="fast"), "backend must be one of"),
        (dict(q=Q.double(), k=K.double(), backend="triton"), "triton backend takes"),
    ],
)
def test_bad_inputs_raise(kwargs, match):
    args = dict(q=Q, k=K, position_ids=POS, inv_freq=FREQ, scaling=1.0, backend="auto") | kwargs
    with pytest.raises(ValueError, match=match):
        apply_rotary(args.pop("q"), args.pop("k"), args.pop("position_ids"), args.pop("inv_freq"), **args)


def test_auto_falls_back_where_the_kernels_cannot_run(monkeypatch):
    """Where ``auto`` picks Triton (CUDA, simulated by patching resolve_backend), inputs the kernels do not take
    (float64) run on the reference, logged once; ``backend="triton"`` raises for them."""
    module = sys.modules[apply_rotary.__module__]
    monkeypatch.setattr(
        module, "resolve_backend", lambda op, backend, device: "torch" if backend == "torch" else "triton"
    )
    q, k, pos = torch.randn(4, 2, 8, dtype=torch.float64), torch.randn(4, 1, 8, dtype=torch.float64), torch.arange(4)
    want = apply_rotary_reference(q, k, pos, inv_freq_for(8, "cpu"))
    for got, ref in zip(apply_rotary(q, k, pos, inv_freq_for(8, "cpu")), want, strict=True):
        assert torch.equal(got, ref)
    with pytest.raises(ValueError, match="triton backend takes"):
        apply_rotary(q, k, pos, inv_freq_for(8, "cpu"), backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize(
    "n_tokens, n_q, n_k, head_dim", [(16384, 32, 8, 128), (8192, 32, 8, 64), (4099, 16, 2, 128), (97, 5, 1, 96)]
)
@pytest.mark.parametrize("scaling", [1.0, 0.8])
@pytest.mark.parametrize("inplace", [False, True])
def test_gpu_bf16_matches_reference(n_tokens, n_q, n_k, head_dim, scaling, inplace):
    check_against_reference(n_tokens, n_q, n_k, head_dim, torch.bfloat16, scaling, "cuda", "auto", inplace=inplace)


@pytest.mark.gpu
@pytest.mark.parametrize("inplace", [False, True])
def test_gpu_bf16_strided_inputs(inplace):
    check_against_reference(4096, 32, 8, 128, torch.bfloat16, 1.0, "cuda", "auto", fused_qkv=True, inplace=inplace)
