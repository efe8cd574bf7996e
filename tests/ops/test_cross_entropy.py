"""Tests of fused_linear_cross_entropy: torch and Triton (interpreter on CPU) paths against a float64 oracle.

CPU: fp32/fp16 only (the interpreter's bf16 tl.dot is wrong, though this kernel uses no dot) and small shapes, the
interpreter is slow. GPU tests (marked ``gpu``) cover bf16, the chunked path at realistic sizes and the no-sync rule.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from veofast.ops.cross_entropy import fused_linear_cross_entropy, fused_linear_cross_entropy_reference

BACKENDS = ["torch", "triton"]


def oracle(
    hidden,
    weight,
    labels,
    *,
    bias=None,
    ignore_index=-100,
    reduction="mean",
    num_items_in_batch=None,
    label_smoothing=0.0,
    lse_square_scale=0.0,
    softcap=None,
):
    """Unchunked float64 definition: returns (loss, z_term)."""
    logits = hidden.double() @ weight.double().t()
    if bias is not None:
        logits = logits + bias.double()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    valid = labels != ignore_index
    ce = F.cross_entropy(
        logits, labels.long(), ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing
    )
    z = torch.where(valid, lse_square_scale * torch.logsumexp(logits, -1) ** 2, 0.0)
    per_token = ce + z
    if reduction == "none":
        return per_token, z
    if reduction == "sum":
        return per_token.sum(), z.sum()
    denom = valid.sum().clamp(min=1) if num_items_in_batch is None else max(int(num_items_in_batch), 1)
    return per_token.sum() / denom, z.sum() / denom


def make_inputs(n, h, v, *, dtype=torch.float32, device="cpu", ignored=0.1, bias=False, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen) * 2.0
    weight = torch.randn(v, h, generator=gen) / h**0.5
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[torch.rand(n, generator=gen) < ignored] = -100
    b = torch.randn(v, generator=gen) if bias else None
    to = dict(device=device, dtype=dtype)
    return hidden.to(**to), weight.to(**to), labels.to(device), None if b is None else b.to(**to)


def run(fn, hidden, weight, labels, bias=None, grad_out=None, **kwargs):
    """Forward + backward on fresh leaves; returns (loss, z_term, grad_hidden, grad_weight, grad_bias)."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    loss, z = fn(leaves[0], leaves[1], labels, bias=leaves[2], return_z_loss=True, **kwargs)
    (loss if grad_out is None else loss * grad_out.to(loss)).sum().backward()
    return loss.detach(), z, *(t.grad if t is not None else None for t in leaves)


def oracle_run(hidden, weight, labels, bias=None, grad_out=None, **kwargs):
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    loss, z = oracle(leaves[0], leaves[1], labels, bias=leaves[2], **kwargs)
    (loss if grad_out is None else loss * grad_out.double()).sum().backward()
    return loss.detach(), z.detach(), *(t.grad if t is not None else None for t in leaves)


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def assert_close64(got, want, *, rtol):
    """Every result within ``rtol`` of the oracle, relative to the oracle's largest magnitude."""
    for name, g, w in zip(["loss", "z", "grad_hidden", "grad_weight", "grad_bias"], got, want, strict=True):
        if w is None:
            assert g is None, name
            continue
        assert torch.isfinite(g).all(), name
        assert max_err(g, w) <= rtol * max(w.abs().max().item(), 1e-3), (name, max_err(g, w), w.abs().max().item())


def call(backend):
    return lambda *a, **k: fused_linear_cross_entropy(*a, backend=backend, **k)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,h,v", [(1, 16, 1001), (97, 32, 1001), (48, 64, 257)])
def test_fp32_matches_float64(backend, n, h, v):
    inputs = make_inputs(n, h, v)
    assert_close64(run(call(backend), *inputs), oracle_run(*inputs), rtol=1e-5)


FEATURES = [
    dict(reduction="sum"),
    dict(reduction="none"),
    dict(num_items_in_batch=50),
    dict(num_items_in_batch="tensor"),
    dict(label_smoothing=0.1),
    dict(lse_square_scale=1e-2),
    dict(softcap=3.0),
    dict(bias=True),
    dict(ignore_index=5, label_smoothing=0.2, lse_square_scale=1e-3, softcap=5.0, bias=True, reduction="none"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("feature", FEATURES, ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()))
def test_features_match_float64(backend, feature):
    kwargs = dict(feature)
    hidden, weight, labels, bias = make_inputs(40, 32, 301, bias=kwargs.pop("bias", False))
    if kwargs.get("ignore_index") is not None:
        labels[labels == -100] = kwargs["ignore_index"]
    if kwargs.get("num_items_in_batch") == "tensor":
        kwargs["num_items_in_batch"] = torch.tensor(77)
    grad_out = torch.rand(40) + 0.5 if kwargs.get("reduction") == "none" else None
    got = run(call(backend), hidden, weight, labels, bias, grad_out, **kwargs)
    assert_close64(got, oracle_run(hidden, weight, labels, bias, grad_out, **kwargs), rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("factor", [1.0, 0.37])
def test_incoming_gradient_scales_grads(backend, reduction, factor):
    """Gradients made in the forward pass are scaled by the loss's incoming gradient (skipped work when it is 1)."""
    inputs = make_inputs(24, 16, 101, bias=True)
    grad_out = torch.tensor(factor)
    got = run(call(backend), *inputs, grad_out=grad_out, reduction=reduction)
    assert_close64(got, oracle_run(*inputs, grad_out=grad_out, reduction=reduction), rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_gives_zero_loss_and_grads(backend, reduction):
    hidden, weight, labels, bias = make_inputs(8, 16, 101, bias=True)
    labels.fill_(-100)
    loss, z, gh, gw, gb = run(call(backend), hidden, weight, labels, bias, reduction=reduction, lse_square_scale=0.1)
    for t in (loss, z, gh, gw, gb):
        assert torch.isfinite(t).all() and (t == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_error_bound(backend):
    """|fast - ref64| <= 2 |torch fp16 - ref64| + floor, with torch fp16 = (h @ W.T).float() -> F.cross_entropy."""
    hidden, weight, labels, _ = make_inputs(48, 64, 1001, dtype=torch.float16)
    want = oracle_run(hidden, weight, labels)
    got = run(call(backend), hidden, weight, labels)
    eager = run(
        lambda h, w, y, bias=None, return_z_loss=True: (F.cross_entropy((h @ w.t()).float(), y), 0 * h.sum()),
        hidden,
        weight,
        labels,
    )
    for i, name in [(0, "loss"), (2, "grad_hidden"), (3, "grad_weight")]:
        floor = 1e-3 * want[i].abs().max().item()
        assert max_err(got[i], want[i]) <= 2 * max_err(eager[i], want[i]) + floor, name


PASS_OPTIONS = dict(
    ignore_index=-100,
    label_smoothing=0.1,
    lse_square_scale=1e-2,
    softcap=4.0,
    grad_hidden=True,
    grad_weight=True,
    grad_bias=True,
)


@pytest.mark.parametrize("row_programs", [0, 3])
def test_kernel_chunks_and_vocab_blocks(row_programs, monkeypatch):
    """The launcher on several token chunks and vocab blocks (ragged last ones), with one row-kernel program per
    token or a few looping over them, matches the reference pass."""
    import veofast.kernels.cross_entropy as kernels

    from veofast.ops.cross_entropy import _reference_pass

    monkeypatch.setattr(kernels, "CHUNK_ROW_MULTIPLE", 16)
    hidden, weight, labels, bias = make_inputs(40, 16, 300, bias=True)
    scale = torch.rand(40) + 0.5
    got = kernels.linear_cross_entropy_pass(
        hidden, weight, bias, labels, scale, chunk_bytes=1, block_v=128, row_programs=row_programs, **PASS_OPTIONS
    )
    want = _reference_pass(hidden, weight, bias, labels, scale, **PASS_OPTIONS)
    for g, w in zip(got, want, strict=True):
        assert max_err(g, w) <= 1e-5 * w.abs().max().item()


def test_chunk_rows_rule():
    from veofast.kernels.cross_entropy import CHUNK_ROW_MULTIPLE, LARGE_CHUNK_ROW_MULTIPLE, chunk_rows

    budget = 512 * 2**20
    assert chunk_rows(4096, 32000, 2, budget_bytes=budget) == 4096  # fits: one chunk of all tokens
    for n, v in [(16384, 151936), (4096, 151936), (65536, 262144), (1000, 10**7), (100000, 32000)]:
        rows = chunk_rows(n, v, 2, budget_bytes=budget)
        fit = budget // (2 * v)
        multiple = LARGE_CHUNK_ROW_MULTIPLE if fit >= 2 * LARGE_CHUNK_ROW_MULTIPLE else CHUNK_ROW_MULTIPLE
        assert rows % multiple == 0 and (rows * v * 2 <= budget or rows == multiple)
        assert -(-n // rows) == -(-n // max(multiple, fit // multiple * multiple))  # the fewest chunks that fit
    assert chunk_rows(16384, 151936, 2, budget_bytes=budget) == 1536  # 1766 fit: 11 chunks of 1490, rounded up
    assert chunk_rows(0, 100, 4, budget_bytes=budget) == 1
    # up to whole_up_to tokens (the pass: H, when it computes grad_weight) go in one chunk whatever the budget
    assert chunk_rows(4096, 151936, 2, budget_bytes=budget, whole_up_to=4096) == 4096
    past = chunk_rows(4097, 151936, 2, budget_bytes=budget)
    assert chunk_rows(4097, 151936, 2, budget_bytes=budget, whole_up_to=4096) == past < 4097


def test_default_chunk_budget_grows_with_the_tokens():
    """256 MiB up to the anchor shape; then what hidden and its gradient take, capped at 1 GiB."""
    from veofast.kernels.cross_entropy import DEFAULT_CHUNK_BYTES, MAX_CHUNK_BYTES, default_chunk_bytes

    assert default_chunk_bytes(16384, 4096, 2) == DEFAULT_CHUNK_BYTES == 256 * 2**20
    assert default_chunk_bytes(100, 64, 4) == DEFAULT_CHUNK_BYTES
    assert default_chunk_bytes(24576, 4096, 2) == 2 * 24576 * 4096 * 2
    assert default_chunk_bytes(65536, 4096, 2) == MAX_CHUNK_BYTES == 2**30


def test_reference_chunks(monkeypatch):
    import veofast.ops.cross_entropy as op

    monkeypatch.setattr(op, "REFERENCE_CHUNK_ELEMENTS", 7 * 301)
    inputs = make_inputs(40, 32, 301, bias=True)
    assert_close64(run(fused_linear_cross_entropy_reference, *inputs), oracle_run(*inputs), rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims_and_int32_labels(backend):
    hidden, weight, labels, _ = make_inputs(24, 16, 101)
    want = oracle(hidden, weight, labels, reduction="none")[0]
    loss = fused_linear_cross_entropy(
        hidden.view(2, 12, 16), weight, labels.view(2, 12).int(), reduction="none", backend=backend
    )
    assert loss.shape == (2, 12) and max_err(loss.flatten(), want) <= 1e-5 * want.abs().max().item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_no_grad(backend, reduction):
    hidden, weight, labels, _ = make_inputs(16, 16, 101)
    with torch.no_grad():
        loss = fused_linear_cross_entropy(hidden.requires_grad_(), weight, labels, reduction=reduction, backend=backend)
    want = oracle(hidden, weight, labels, reduction=reduction)[0]
    assert loss.shape == want.shape and max_err(loss, want) <= 1e-5 * want.abs().max().item()


def test_out_of_range_labels():
    hidden, weight, labels, _ = make_inputs(8, 16, 101)
    labels[3] = 101
    with pytest.raises(ValueError, match="labels"):
        fused_linear_cross_entropy(hidden, weight, labels, backend="torch")
    # The Triton path cannot check without a sync: such a token is treated as ignored.
    got = fused_linear_cross_entropy(hidden, weight, labels, backend="triton")
    labels[3] = -100
    assert max_err(got, oracle(hidden, weight, labels)[0]) <= 1e-5


def test_auto_falls_back_where_the_kernels_cannot_run(monkeypatch):
    """Where ``auto`` picks Triton (CUDA, simulated by patching resolve_backend), float64 inputs run on the torch
    backend; ``backend="triton"`` raises for them."""
    import veofast.ops.cross_entropy as module

    monkeypatch.setattr(
        module, "resolve_backend", lambda op, backend, device: "torch" if backend == "torch" else "triton"
    )
    hidden, weight = torch.randn(5, 8, dtype=torch.float64), torch.randn(11, 8, dtype=torch.float64)
    labels = torch.tensor([1, 0, -100, 10, 3])
    expected = fused_linear_cross_entropy_reference(hidden, weight, labels)
    assert torch.equal(fused_linear_cross_entropy(hidden, weight, labels), expected)
    with pytest.raises(ValueError, match="triton backend takes"):
        fused_linear_cross_entropy(hidden, weight, labels, backend="triton")


def test_bad_inputs():
    hidden, weight, labels, _ = make_inputs(4, 8, 11)
    f = fused_linear_cross_entropy
    with pytest.raises(ValueError, match="weight"):
        f(hidden, weight[:, :4], labels)
    with pytest.raises(ValueError, match="weight"):
        f(hidden, weight.double(), labels)
    with pytest.raises(ValueError, match="labels"):
        f(hidden, weight, labels[:3])
    with pytest.raises(ValueError, match="labels"):
        f(hidden, weight, labels.float())
    with pytest.raises(ValueError, match="bias"):
        f(hidden, weight, labels, bias=torch.zeros(10))
    with pytest.raises(ValueError, match="reduction"):
        f(hidden, weight, labels, reduction="avg")
    with pytest.raises(ValueError, match="backend"):
        f(hidden, weight, labels, backend="cuda")
    with pytest.raises(ValueError, match="num_items_in_batch"):
        f(hidden, weight, labels, num_items_in_batch=-1)
    with pytest.raises(ValueError, match="num_items_in_batch"):
        f(hidden, weight, labels, reduction="sum", num_items_in_batch=3)
    with pytest.raises(ValueError, match="label_smoothing"):
        f(hidden, weight, labels, label_smoothing=1.5)
    with pytest.raises(ValueError, match="softcap"):
        f(hidden, weight, labels, softcap=0.0)
    with pytest.raises(ValueError, match="lse_square_scale"):
        f(hidden, weight, labels, lse_square_scale=-1.0)
    with pytest.raises(ValueError, match="labels"):
        f(hidden, weight, labels.to("meta"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile(backend):
    inputs = make_inputs(16, 16, 101)
    torch._dynamo.reset()
    compiled = torch.compile(call(backend), backend="aot_eager", fullgraph=True)
    assert_close64(run(compiled, *inputs, lse_square_scale=1e-3), oracle_run(*inputs, lse_square_scale=1e-3), rtol=1e-5)



@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignored", [0.0, 0.45, 1.0])
def test_num_label_tokens_skips_ignored_rows(backend, reduction, ignored, monkeypatch):
    """Given the count of kept labels, only those rows are computed (in several chunks here) and the results match
    the float64 oracle, as without the count."""
    import veofast.kernels.cross_entropy as kernels

    monkeypatch.setattr(kernels, "CHUNK_ROW_MULTIPLE", 8)
    monkeypatch.setattr(kernels, "DEFAULT_CHUNK_BYTES", 1)  # chunks of 8 kept rows
    inputs = make_inputs(53, 16, 257, ignored=ignored, bias=True, seed=3)
    count = int((inputs[2] != -100).sum())
    grad_out = torch.rand(53) + 0.5 if reduction == "none" else None
    kwargs = dict(reduction=reduction, label_smoothing=0.1, lse_square_scale=1e-3)
    got = run(call(backend), *inputs, grad_out, num_label_tokens=count, **kwargs)
    assert_close64(got, oracle_run(*inputs, grad_out, **kwargs), rtol=1e-5)


def test_kernel_row_index_matches_reference(monkeypatch):
    """The launcher computing a subset of rows (gathered per chunk) matches the reference pass on that subset; the
    rows left out get zero loss and gradient."""
    import veofast.kernels.cross_entropy as kernels

    from veofast.ops.cross_entropy import _reference_pass

    monkeypatch.setattr(kernels, "CHUNK_ROW_MULTIPLE", 4)
    hidden, weight, labels, bias = make_inputs(30, 16, 129, ignored=0.0, bias=True)
    scale = torch.rand(30) + 0.5
    rows = torch.tensor([0, 3, 4, 9, 17, 18, 19, 25, 29])
    got = kernels.linear_cross_entropy_pass(
        hidden, weight, bias, labels, scale, chunk_bytes=1, row_index=rows, **PASS_OPTIONS
    )
    want = _reference_pass(hidden, weight, bias, labels, scale, row_index=rows, **PASS_OPTIONS)
    left_out = torch.ones(30, dtype=torch.bool)
    left_out[rows] = False
    for g, w in zip(got, want, strict=True):
        assert max_err(g, w) <= 1e-5 * w.abs().max().item()
    for g in (got[0], got[1], got[2]):
        assert g[left_out].eq(0).all()
    dense = _reference_pass(hidden, weight, bias, torch.where(left_out, -100, labels), scale, **PASS_OPTIONS)
    for g, w in zip(got, dense, strict=True):
        assert max_err(g, w) <= 1e-5 * w.abs().max().item()


@pytest.mark.parametrize("backend", BACKENDS)
def test_num_label_tokens_errors(backend):
    hidden, weight, labels, _ = make_inputs(20, 8, 31, ignored=0.3)
    count = int((labels != -100).sum())
    f = call(backend)
    with pytest.raises(ValueError, match=rf"num_label_tokens={count + 1} .* \({count}\)"):
        f(hidden, weight, labels, num_label_tokens=count + 1)
    for bad in (-1, 21, 2.0, True, torch.tensor(count)):
        with pytest.raises(ValueError, match="num_label_tokens must be"):
            f(hidden, weight, labels, num_label_tokens=bad)


def test_num_label_tokens_under_torch_compile():
    inputs = make_inputs(16, 16, 101, ignored=0.5)
    count = int((inputs[2] != -100).sum())
    torch._dynamo.reset()
    compiled = torch.compile(call("torch"), backend="aot_eager", fullgraph=True)
    assert_close64(run(compiled, *inputs, num_label_tokens=count), oracle_run(*inputs), rtol=1e-5)

# --- GPU ---------------------------------------------------------------------------------------------------------


def eager_torch(hidden, weight, labels, bias=None, return_z_loss=True):
    """torch's own path in the input dtype: logits in that dtype, then fp32 cross-entropy."""
    return F.cross_entropy((hidden @ weight.t()).float(), labels), torch.zeros(())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk_bytes", [None, 16 * 2**20])
def test_gpu_error_bound(dtype, chunk_bytes, monkeypatch):
    """N=2048, H=1024, V=32003: |triton - ref64| <= 2 |torch same-dtype - ref64| + floor.

    With 16 MiB chunks (8 chunks of 256 rows) grad_weight is accumulated chunk by chunk in the weight's dtype, so its
    rounding error grows like sqrt(chunks): its bound is 2 sqrt(chunks) |torch - ref64| + floor.
    """
    import veofast.kernels.cross_entropy as kernels

    if chunk_bytes is not None:
        monkeypatch.setattr(kernels, "DEFAULT_CHUNK_BYTES", chunk_bytes)
    n, h, v = 2048, 1024, 32003
    chunks = -(-n // kernels.chunk_rows(n, v, 2, budget_bytes=kernels.default_chunk_bytes(n, h, 2)))
    inputs = make_inputs(n, h, v, dtype=dtype, device="cuda")
    want = oracle_run(*inputs)
    got = run(call("triton"), *inputs)
    eager = run(eager_torch, *inputs)
    for i, name, k in [(0, "loss", 2), (2, "grad_hidden", 2), (3, "grad_weight", 2 * chunks**0.5)]:
        floor = 1e-3 * want[i].abs().max().item()
        assert max_err(got[i], want[i]) <= k * max_err(eager[i], want[i]) + floor, name


@pytest.mark.gpu
@pytest.mark.parametrize("row_programs", [0, 132])
@pytest.mark.parametrize("features", [{}, dict(label_smoothing=0.1, lse_square_scale=1e-4, softcap=30.0, bias=True)])
def test_gpu_pass_bf16(row_programs, features):
    """The pass in bf16, N=1031, H=512, V=32003 in 9 chunks of 128 tokens, one row-kernel program per token or 132
    looping over them: |pass - ref64| <= 2 |torch bf16 - ref64| + floor (grad_weight, accumulated over chunks:
    2 sqrt(chunks))."""
    import veofast.kernels.cross_entropy as kernels

    from veofast.ops.cross_entropy import _reference_pass

    kwargs = dict(features)
    n, h, v = 1031, 512, 32003
    hidden, weight, labels, bias = make_inputs(n, h, v, dtype=torch.bfloat16, device="cuda", bias=kwargs.pop("bias", 0))
    scale = torch.full((), 1.0 / n, device="cuda")
    options = dict(PASS_OPTIONS, label_smoothing=0.0, lse_square_scale=0.0, softcap=None, grad_bias=bias is not None)
    options.update(kwargs)
    chunk_bytes = 8 * 2**20
    chunks = -(-n // kernels.chunk_rows(n, v, 2, budget_bytes=chunk_bytes))
    got = kernels.linear_cross_entropy_pass(
        hidden, weight, bias, labels, scale, chunk_bytes=chunk_bytes, row_programs=row_programs, **options
    )
    torch16 = _reference_pass(hidden, weight, bias, labels, scale, **options)
    b64 = None if bias is None else bias.double()
    want = _reference_pass(hidden.double(), weight.double(), b64, labels, scale.double(), **options)
    for name, g, t, w in zip(["ce", "z", "grad_hidden", "grad_weight", "grad_bias"], got, torch16, want, strict=True):
        if w is None:
            continue
        k = 2 * chunks**0.5 if name == "grad_weight" else 2
        assert max_err(g, w) <= k * max_err(t, w) + 1e-3 * w.abs().max().item(), name


@pytest.mark.gpu
@pytest.mark.parametrize("feature", FEATURES, ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()))
def test_gpu_features_fp32(feature):
    kwargs = dict(feature)
    hidden, weight, labels, bias = make_inputs(300, 128, 5003, device="cuda", bias=kwargs.pop("bias", False))
    if kwargs.get("ignore_index") is not None:
        labels[labels == -100] = kwargs["ignore_index"]
    if kwargs.get("num_items_in_batch") == "tensor":
        kwargs["num_items_in_batch"] = torch.tensor(77, device="cuda")
    grad_out = torch.rand(300, device="cuda") + 0.5 if kwargs.get("reduction") == "none" else None
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        got = run(call("triton"), hidden, weight, labels, bias, grad_out, **kwargs)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    assert_close64(got, oracle_run(hidden, weight, labels, bias, grad_out, **kwargs), rtol=1e-4)


@pytest.mark.gpu
def test_gpu_no_host_sync():
    hidden, weight, labels, _ = make_inputs(1024, 256, 32003, dtype=torch.bfloat16, device="cuda")
    hidden.requires_grad_()
    weight.requires_grad_()
    count = int((labels != -100).sum())  # the host's count, as a collator gives it
    fused_linear_cross_entropy(hidden, weight, labels).backward()  # warm-up (kernel compilation)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = fused_linear_cross_entropy(hidden, weight, labels, num_items_in_batch=1000, lse_square_scale=1e-4)
        loss.backward()
        fused_linear_cross_entropy(hidden, weight, labels).backward()
        fused_linear_cross_entropy(hidden, weight, labels, num_label_tokens=count).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.gpu
def test_gpu_num_label_tokens_bf16():
    """bf16 with the count given: the skipped rows change nothing beyond rounding (the same chunks of kept rows)."""
    hidden, weight, labels, _ = make_inputs(3000, 512, 32003, dtype=torch.bfloat16, device="cuda", ignored=0.4)
    count = int((labels != -100).sum())
    got = run(call("triton"), hidden, weight, labels, num_label_tokens=count)
    want = oracle_run(hidden, weight, labels)
    eager = run(eager_torch, hidden, weight, labels)
    for i, name in [(0, "loss"), (2, "grad_hidden"), (3, "grad_weight")]:
        floor = 1e-3 * want[i].abs().max().item()
        assert max_err(got[i], want[i]) <= 2 * max_err(eager[i], want[i]) + floor, name
    assert got[2][labels == -100].eq(0).all()

@pytest.mark.gpu
def test_gpu_torch_compile_inductor():
    inputs = make_inputs(512, 256, 32003, dtype=torch.bfloat16, device="cuda")
    torch._dynamo.reset()
    compiled = torch.compile(call("triton"), fullgraph=True)
    got = run(compiled, *inputs)
    want = run(call("triton"), *inputs)
    for g, w in zip(got, want, strict=True):
        if w is not None:
            assert max_err(g, w) <= 1e-2 * w.abs().max().item()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck_float64_torch(reduction):
    """Float64 inputs are computed in float64 on the torch path, and its graph supports the repeated backward passes
    of gradcheck."""
    hidden, weight, labels, bias = make_inputs(5, 7, 11, dtype=torch.float64, ignored=0.2, bias=True, seed=1)
    leaves = [t.requires_grad_() for t in (hidden, weight, bias)]
    options = dict(reduction=reduction, label_smoothing=0.1, lse_square_scale=1e-2, softcap=3.0, backend="torch")
    assert torch.autograd.gradcheck(lambda h, w, b: fused_linear_cross_entropy(h, w, labels, bias=b, **options), leaves)


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_backward_of_one_graph(backend):
    """retain_graph=True and a second backward: the torch path gives the same gradients again, the Triton path
    (gradients scaled in place) raises a clear error."""
    hidden, weight, labels, _ = make_inputs(9, 16, 37)
    hidden.requires_grad_()
    loss = fused_linear_cross_entropy(hidden, weight, labels, backend=backend) * 0.5
    (first,) = torch.autograd.grad(loss, hidden, retain_graph=True)
    if backend == "triton":
        with pytest.raises(RuntimeError, match="one backward per forward"):
            torch.autograd.grad(loss, hidden)
    else:
        (second,) = torch.autograd.grad(loss, hidden)
        torch.testing.assert_close(second, first, rtol=0, atol=0)


@pytest.mark.parametrize("num_items_in_batch", [None, 3, "tensor"])
def test_float64_mean_is_exact(num_items_in_batch):
    """float64 inputs are normalised by a float64 count (an fp32 1/3 put the loss 3e-8 off)."""
    gen = torch.Generator().manual_seed(0)
    hidden, weight = (torch.randn(rows, 7, generator=gen, dtype=torch.float64) for rows in (5, 11))
    labels = torch.tensor([1, -100, 4, -100, 10])
    if num_items_in_batch == "tensor":
        num_items_in_batch = torch.tensor(3)
    loss = fused_linear_cross_entropy(hidden, weight, labels, num_items_in_batch=num_items_in_batch, backend="torch")
    expected = F.cross_entropy(hidden @ weight.t(), labels, reduction="sum") / 3
    assert loss.dtype == torch.float64
    assert abs(loss.item() - expected.item()) <= 1e-14 * abs(expected.item())
