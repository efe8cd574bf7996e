"""How the public ops are called, across ops and both backends (Triton under the interpreter on CPU): grad modes,
inputs of which only some require grad, strided index tensors, empty inputs, devices, determinism and
torch.compile with changing shapes. The numerics of each op are tested in its own file."""

from __future__ import annotations

import itertools
import math
import sys
from collections.abc import Callable
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend

from veofast.ops import (
    _backend,
    apply_rotary,
    expert_ffn,
    fused_linear_cross_entropy,
    grouped_mm,
    moe_ffn,
    moe_ffn_reference,
    moe_unpermute,
    rms_norm,
    swiglu,
    varlen_attention,
)
from veofast.ops.moe import expert_ffn_reference, grouped_mm_reference

BACKENDS = ["torch", "triton"]
T = 7  # tokens
POSITIONS = torch.tensor([0, 1, 2, 0, 1, 0, 3])
INV_FREQ = 1.0 / 10000 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16)
CU_SEQLENS = torch.tensor([0, 3, 7], dtype=torch.int32)
LABELS = torch.tensor([1, -100, 3, 4, 10, 6, 0])
TOPK_IDS = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 2], [1, 0], [2, 1], [2, 2]])
OFFSETS = torch.tensor([2, 2, 8], dtype=torch.int32)
# T * 2 slots over T * 2 rows, as moe_permute lays them out with two slots dropped: rows 12 and 13 unreferenced
ROW_INDEX = torch.tensor([0, 5, 1, -1, 2, 6, 3, 7, 4, 8, 9, -1, 10, 11], dtype=torch.int32)


class Op(NamedTuple):
    """A call of a public op: ``call(backend, *tensors)``, the tensors' names and shapes, and which of them are
    differentiable (the others are index tensors, passed as given)."""

    call: Callable
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...] | torch.Tensor, ...]  # a shape (random floats) or a fixed tensor
    differentiable: tuple[int, ...]

    def tensors(self, seed: int = 0) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        return [s.clone() if isinstance(s, torch.Tensor) else torch.randn(s, generator=gen) for s in self.shapes]


OPS = {
    "rms_norm": Op(lambda b, x, w: rms_norm(x, w, 1e-6, backend=b), ("x", "weight"), ((T, 24), (24,)), (0, 1)),
    "add_rms_norm": Op(
        lambda b, x, r, w: rms_norm(x, w, 1e-6, residual=r, backend=b),
        ("x", "residual", "weight"),
        ((T, 24), (T, 24), (24,)),
        (0, 1, 2),
    ),
    "swiglu": Op(lambda b, g, u: swiglu(g, u, backend=b), ("gate", "up"), ((T, 24), (T, 24)), (0, 1)),
    "apply_rotary": Op(
        lambda b, q, k, p, f: apply_rotary(q, k, p, f, backend=b),
        ("q", "k", "position_ids", "inv_freq"),
        ((T, 2, 16), (T, 1, 16), POSITIONS, INV_FREQ),
        (0, 1),
    ),
    "apply_rotary inplace": Op(
        lambda b, q, k, p, f: apply_rotary(q * 1.0, k * 1.0, p, f, inplace=True, backend=b),
        ("q", "k", "position_ids", "inv_freq"),
        ((T, 2, 16), (T, 1, 16), POSITIONS, INV_FREQ),
        (0, 1),
    ),
    "varlen_attention": Op(
        lambda b, q, k, v, cu_q, cu_k: varlen_attention(q, k, v, cu_q, cu_k, T + 2, T + 2, backend=b),
        ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k"),
        ((T, 2, 16), (T, 1, 16), (T, 1, 16), CU_SEQLENS, CU_SEQLENS),
        (0, 1, 2),
    ),
    "fused_linear_cross_entropy": Op(
        lambda b, h, w, y, bias: fused_linear_cross_entropy(h, w, y, bias=bias, reduction="none", backend=b),
        ("hidden", "weight", "labels", "bias"),
        ((T, 16), (11, 16), LABELS, (11,)),
        (0, 1, 3),
    ),
    "moe_ffn": Op(
        lambda b, h, ids, tw, gu, dn: moe_ffn(h, ids, tw, gu, dn, backend=b),
        ("hidden", "topk_ids", "topk_weights", "gate_up_proj", "down_proj"),
        ((T, 16), TOPK_IDS, (T, 2), (3, 8, 16), (3, 16, 4)),
        (0, 2, 3, 4),
    ),
    "moe_unpermute": Op(
        lambda b, rows, ri, tw: moe_unpermute(rows, ri, tw, backend=b),
        ("rows", "row_index", "topk_weights"),
        ((2 * T, 16), ROW_INDEX, (T, 2)),
        (0, 2),
    ),
    "grouped_mm": Op(
        lambda b, x, w, offs: grouped_mm(x, w, offs, backend=b),
        ("x", "w", "expert_offsets"),
        ((8, 16), (3, 16, 12), OFFSETS),
        (0, 1),
    ),
    "expert_ffn": Op(
        lambda b, x, offs, gu, dn: expert_ffn(x, offs, gu, dn, backend=b),
        ("rows", "expert_offsets", "gate_up_proj", "down_proj"),
        ((8, 16), OFFSETS, (3, 8, 16), (3, 16, 4)),
        (0, 2, 3),
    ),
}


def _outputs(result) -> list[torch.Tensor]:
    return list(result) if isinstance(result, tuple) else [result]


def _weighted_sum(outputs: list[torch.Tensor]) -> torch.Tensor:
    """A loss that weights every output element differently."""
    return sum((t.float() * torch.linspace(-1, 1, t.numel(), device=t.device).view_as(t)).sum() for t in outputs)


def _run(op: Op, backend: str, tensors: list[torch.Tensor], needs_grad: tuple[int, ...]):
    """Outputs and the gradients of ``_weighted_sum`` wrt the tensors ``needs_grad`` (None for the others); index
    tensors are passed as given (a clone would make a strided one contiguous)."""
    leaves = [
        t.detach().clone().requires_grad_(i in needs_grad) if t.is_floating_point() else t
        for i, t in enumerate(tensors)
    ]
    outputs = _outputs(op.call(backend, *leaves))
    loss = _weighted_sum(outputs)
    if loss.requires_grad:
        loss.backward()
    return [t.detach() for t in outputs], [t.grad for t in leaves]


# ------------------------------------------------------------------------------------------------ grad modes
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(OPS))
def test_grad_modes_and_partial_requires_grad(name, backend):
    """no_grad and inference_mode give the grad-mode outputs, requiring no grad; with only one differentiable input
    requiring grad, its gradient is the one of the full call (bitwise: runs are deterministic) and the others stay
    None."""
    op = OPS[name]
    tensors = op.tensors()
    outputs, grads = _run(op, backend, tensors, op.differentiable)
    again, grads_again = _run(op, backend, tensors, op.differentiable)
    for a, b in zip(outputs + grads, again + grads_again, strict=True):
        assert (a is None and b is None) or torch.equal(a, b), "two runs differ"
    for mode in (torch.no_grad, torch.inference_mode):
        leaves = [t.clone().requires_grad_(i in op.differentiable) for i, t in enumerate(tensors)]
        with mode():
            got = _outputs(op.call(backend, *leaves))
        for g, want in zip(got, outputs, strict=True):
            assert not g.requires_grad and torch.equal(g, want), mode.__name__
    for i in op.differentiable:
        _, partial = _run(op, backend, tensors, (i,))
        for j, g in enumerate(partial):
            if j == i:
                torch.testing.assert_close(g, grads[i], rtol=1e-6, atol=1e-6, msg=op.names[i])
            else:
                assert g is None, op.names[j]


@pytest.mark.parametrize("backend", BACKENDS)
def test_rotary_inplace_under_no_grad_returns_q_and_k(backend):
    """With inplace=True the op returns q and k themselves, also under no_grad for tensors that require grad (the
    Triton path returned aliases that required no grad)."""
    q, k = (torch.randn(T, h, 16, requires_grad=True) for h in (2, 1))
    with torch.no_grad():
        q_out, k_out = apply_rotary(q, k, POSITIONS, INV_FREQ, inplace=True, backend=backend)
    assert q_out is q and k_out is k


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("expanded", ["q", "k"])
def test_rotary_inplace_rejects_expanded_tensors(backend, expanded):
    """An expanded q or k (rows sharing memory) cannot be rotated in place: ValueError before anything is written
    (the Triton path silently left the shared row rotated by whichever position came last)."""
    shared = torch.randn(1, 2, 16)
    q, k = torch.randn(T, 2, 16), torch.randn(T, 1, 16)
    if expanded == "q":
        q = shared.expand(T, 2, 16)
    else:
        k = shared[:, :1].expand(T, 1, 16)
    before = shared.clone()
    with pytest.raises(ValueError, match=f"{expanded} must not be expanded"):
        apply_rotary(q, k, POSITIONS, INV_FREQ, inplace=True, backend=backend)
    assert torch.equal(shared, before)


# ---------------------------------------------------------------------------------------- layouts and devices
def _strided(t: torch.Tensor) -> torch.Tensor:
    """The values of the 1-D ``t`` in a non-contiguous view (every other element of a buffer twice as long)."""
    buffer = torch.zeros(2 * t.numel(), dtype=t.dtype)
    buffer[::2] = t
    return buffer[::2]


@pytest.mark.parametrize("name", ["varlen_attention", "grouped_mm", "expert_ffn"])
def test_strided_index_tensors(name):
    """Strided cu_seqlens / expert_offsets give the results of contiguous ones on the Triton path (its kernels
    read them as flat arrays: they gave wrong outputs)."""
    op = OPS[name]
    tensors = op.tensors()
    want, want_grads = _run(op, "triton", tensors, op.differentiable)
    strided = [t if t.is_floating_point() else _strided(t) for t in tensors]
    assert not all(t.is_contiguous() for t in strided)
    got, got_grads = _run(op, "triton", strided, op.differentiable)
    for g, w in zip(got + got_grads, want + want_grads, strict=True):
        assert (g is None and w is None) or torch.equal(g, w)


@pytest.mark.parametrize("name", list(OPS))
def test_tensor_on_another_device_raises_naming_it(name):
    """A tensor on another device (meta here, the only other one on a CPU machine) raises ValueError naming the
    argument and the device, before any kernel runs."""
    op = OPS[name]
    tensors = op.tensors()
    for i, arg in enumerate(op.names):
        moved = [t.to("meta") if j == i else t for j, t in enumerate(tensors)]
        with pytest.raises(ValueError, match=f"{arg}[^\n]*meta|meta[^\n]*{arg}"):
            op.call("triton", *moved)


def test_moe_dtype_mismatch_names_the_activations():
    op = OPS["moe_ffn"]
    hidden, ids, weights, gate_up, down = op.tensors()
    with pytest.raises(ValueError, match="gate_up_proj must have hidden's dtype torch.float16"):
        moe_ffn(hidden.half(), ids, weights, gate_up, down)
    with pytest.raises(ValueError, match="gate_up_proj must have rows's dtype torch.float16"):
        expert_ffn(hidden.half(), OFFSETS[:1].clone(), gate_up[:1], down[:1])


@pytest.mark.parametrize(
    "name, reference",
    [("moe_ffn", moe_ffn_reference), ("expert_ffn", expert_ffn_reference), ("grouped_mm", grouped_mm_reference)],
)
def test_moe_float64_runs_on_the_reference_where_auto_picks_triton(monkeypatch, name, reference):
    """The grouped GEMM kernels do not take float64 (the interpreter's results were garbage): where ``auto`` picks
    Triton (CUDA, simulated by patching resolve_backend) float64 runs on the reference; ``"triton"`` raises."""
    module = sys.modules[moe_ffn.__module__]
    monkeypatch.setattr(
        module, "resolve_backend", lambda op, backend, device: "torch" if backend == "torch" else "triton"
    )
    op = OPS[name]
    tensors = [t.double() if t.is_floating_point() else t for t in op.tensors()]
    assert torch.equal(op.call("auto", *tensors), reference(*tensors))
    with pytest.raises(ValueError, match="triton backend takes"):
        op.call("triton", *tensors)


# ---------------------------------------------------------------------------------------------- empty inputs
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_without_query_rows_keeps_k_and_v_in_the_graph(backend):
    """No query tokens (0 documents, or documents with keys only): zero gradients for q, k and v on both backends
    (the torch backend left k and v out of the graph: autograd.grad raised, .grad stayed None)."""
    for lens_q, lens_k in (([], []), ([0, 0], [3, 2])):
        cu_q, cu_k = (torch.tensor([0, *itertools.accumulate(n)], dtype=torch.int32) for n in (lens_q, lens_k))
        q = torch.randn(0, 2, 16, requires_grad=True)
        k, v = (torch.randn(sum(lens_k), 1, 16, requires_grad=True) for _ in range(2))
        out = varlen_attention(q, k, v, cu_q, cu_k, 0, max(lens_k, default=0), backend=backend)
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        assert all(g.shape == t.shape and not g.any() for g, t in zip(grads, (q, k, v), strict=True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_hidden_dimension(backend):
    """H = 0 (or I = 0): the logits are 0, so the loss of every kept token is log(V); swiglu gives an empty output;
    rms_norm runs on the reference (the Triton kernel cannot take it: ValueError when asked for). The Triton path
    raised a reshape error for all three, the torch path for the cross-entropy."""
    hidden, weight = torch.randn(3, 0, requires_grad=True), torch.randn(11, 0, requires_grad=True)
    loss = fused_linear_cross_entropy(hidden, weight, torch.tensor([1, -100, 2]), reduction="sum", backend=backend)
    torch.testing.assert_close(loss, torch.tensor(2 * math.log(11)))
    loss.backward()
    assert hidden.grad.shape == (3, 0) and weight.grad.shape == (11, 0)
    gate = torch.randn(3, 0, requires_grad=True)
    assert swiglu(gate, gate.detach(), backend=backend).shape == (3, 0)
    if backend == "triton":
        with pytest.raises(ValueError, match="1 <= H"):
            rms_norm(gate, torch.ones(0), 1e-6, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_experts_no_slots_or_no_vocabulary_raise(backend):
    """E = 0 experts, K = 0 slots per token and V = 0 vocabulary entries are ValueErrors naming the argument on both
    backends (the Triton path read past an empty expert_offsets (a segfault under the interpreter), divided by
    K = 0, divided by V = 0; the torch path failed in zip for E = 0 or returned a detached zero)."""
    hidden, ids, weights, gate_up, down = OPS["moe_ffn"].tensors()
    cases = [
        ("gate_up_proj", lambda: moe_ffn(hidden, ids, weights, gate_up[:0], down[:0], first_expert=0, backend=backend)),
        ("gate_up_proj", lambda: expert_ffn(hidden, OFFSETS[:0], gate_up[:0], down[:0], backend=backend)),
        ("w must have shape", lambda: grouped_mm(hidden, gate_up[:0], OFFSETS[:0], backend=backend)),
        ("topk_ids", lambda: moe_ffn(hidden, ids[:, :0], weights[:, :0], gate_up, down, backend=backend)),
        ("topk_weights", lambda: moe_unpermute(hidden, ids[:0, 0], weights[:, :0], backend=backend)),
        ("weight", lambda: fused_linear_cross_entropy(hidden, hidden[:0], torch.full((T,), -100), backend=backend)),
    ]
    for match, call in cases:
        with pytest.raises(ValueError, match=match):
            call()


# ------------------------------------------------------------------------------------------ other arguments
@pytest.mark.parametrize("backend", BACKENDS)
def test_swiglu_output_is_contiguous_for_transposed_inputs(backend):
    """As its docstring says, on both backends (the torch path returned a transposed output)."""
    gate, up = (torch.randn(24, T).t() for _ in range(2))
    assert swiglu(gate, up, backend=backend).is_contiguous()


def test_non_finite_scalars_raise():
    x = torch.randn(T, 24)
    with pytest.raises(ValueError, match="eps"):
        rms_norm(x, torch.ones(24), float("nan"))
    q, k = torch.randn(T, 2, 16), torch.randn(T, 1, 16)
    for scaling in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="scaling"):
            apply_rotary(q, k, POSITIONS, INV_FREQ, scaling=scaling)


# ------------------------------------------------------------------------------------------------- compile
COMPILED = {  # name -> backends whose path compiles into one graph (the torch paths of attention and MoE read
    # the document and expert boundaries on the host: graph breaks)
    "rms_norm": BACKENDS,
    "add_rms_norm": BACKENDS,
    "swiglu": BACKENDS,
    "apply_rotary": BACKENDS,
    "apply_rotary inplace": BACKENDS,
    "fused_linear_cross_entropy": BACKENDS,
    "varlen_attention": ["triton"],
}


@pytest.mark.parametrize(
    "name, backend", [(name, backend) for name, backends in COMPILED.items() for backend in backends]
)
def test_compile_dynamic_one_graph_for_all_token_counts(name, backend):
    """torch.compile(fullgraph=True, dynamic=True) matches eager, forward and backward, for three token counts,
    and compiles on the first call only (the torch cross-entropy recompiled for every token count: a range() over
    it)."""
    op = OPS[name]
    counter = CompileCounterWithBackend("aot_eager")
    compiled = Op(torch.compile(op.call, fullgraph=True, dynamic=True, backend=counter), *op[1:])
    graphs = []
    for tokens in (4, 7, 9):
        tensors = [_with_tokens(t, tokens) for t in op.tensors(seed=tokens)]
        want, got = (_run(o, backend, tensors, op.differentiable) for o in (op, compiled))
        for g, w in zip(got[0] + got[1], want[0] + want[1], strict=True):
            assert (g is None and w is None) or torch.equal(g, w)
        graphs.append(counter.frame_count)
    assert graphs[0] == graphs[-1], f"graphs compiled after each call: {graphs}"


@pytest.mark.parametrize("name", ["moe_ffn", "grouped_mm", "expert_ffn"])
def test_compile_runs_the_moe_triton_path_eagerly(name):
    """A compiled caller runs the MoE Triton path as eager does, forward and backward (behind a graph break: traced,
    it failed under the interpreter and did not finish compiling on an H200)."""
    op = OPS[name]
    compiled = Op(torch.compile(op.call, dynamic=True, backend="aot_eager"), *op[1:])
    for seed in (0, 1):
        tensors = op.tensors(seed=seed)
        want, got = (_run(o, "triton", tensors, op.differentiable) for o in (op, compiled))
        for g, w in zip(got[0] + got[1], want[0] + want[1], strict=True):
            assert (g is None and w is None) or torch.equal(g, w)


def test_compile_attention_reference_does_not_recompile_per_document_count():
    """The torch path reads the documents on the host; a compiled caller runs it eagerly, so batches with 1 to 6
    documents compile the caller's graphs once (traced, each new document count was a new graph)."""
    counter = CompileCounterWithBackend("aot_eager")

    def caller(q, k, v, cu_seqlens, max_seqlen):
        return 2 * varlen_attention(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, backend="torch")

    compiled = torch.compile(caller, dynamic=True, backend=counter)
    gen = torch.Generator().manual_seed(0)
    graphs = []
    for docs in range(1, 7):
        lengths = torch.randint(1, 6, (docs,), generator=gen)
        cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        q, k, v = (torch.randn(int(lengths.sum()), heads, 8, generator=gen) for heads in (2, 1, 1))
        args = (q, k, v, cu_seqlens, int(lengths.max()))
        assert torch.equal(compiled(*args), caller(*args))
        graphs.append(counter.frame_count)
    assert graphs[1] == graphs[-1], f"graphs compiled after each call: {graphs}"


def test_compile_before_any_eager_call_does_not_recompile(monkeypatch):
    """When the first op call of a process is compiled, the next call does not recompile (dynamo guarded on the
    cached triton import result, which that first call sets)."""
    monkeypatch.setattr(_backend, "_triton_import_error", _backend._UNKNOWN)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(lambda x: rms_norm(x, torch.ones(8), 1e-6), fullgraph=True, dynamic=True, backend=counter)
    for tokens in (3, 5):
        compiled(torch.randn(tokens, 8))
    assert counter.frame_count == 1


def _with_tokens(t: torch.Tensor, tokens: int) -> torch.Tensor:
    """``t`` with ``tokens`` rows when it has a token axis (T rows), repeated cyclically; cu_seqlens end there."""
    if t.dtype == torch.int32:  # cu_seqlens
        return torch.tensor([0, tokens // 2, tokens], dtype=torch.int32)
    if t.shape[0] != T:
        return t
    return t[torch.arange(tokens) % T]


def test_every_public_op_exports_its_reference():
    """``veofast.ops`` gives each op's plain-torch definition beside it (``<op>_reference``)."""
    import veofast.ops

    ops = [name for name in veofast.ops.__all__ if name[0].islower() and not name.endswith("_reference")]
    missing = [name for name in ops if f"{name}_reference" not in veofast.ops.__all__]
    assert len(ops) == 10 and not missing, missing


# ------------------------------------------------------------------------------------------------ autocast
# The ops built on matmuls, and the indices of the tensors that autocast casts there (as F.linear's or SDPA's).
AUTOCAST_CAST = {
    "varlen_attention": (0, 1, 2),
    "fused_linear_cross_entropy": (0, 1, 3),
    "moe_ffn": (0, 3, 4),
    "grouped_mm": (0, 1),
    "expert_ffn": (0, 2, 3),
}


def _check_autocast(name: str, backend: str, device: str, dtype: torch.dtype) -> None:
    """fp32 inputs inside ``torch.autocast(device, dtype)`` give the outputs of the same call outside it on the
    operands cast to ``dtype``, and each fp32 input gets that call's gradient in fp32 (the cast is differentiable;
    the backward runs after the autocast region, as torch's AMP recipe has it)."""
    op = OPS[name]
    tensors = [t.to(device) for t in op.tensors(seed=2)]
    cast = [t.to(dtype) if i in AUTOCAST_CAST[name] else t for i, t in enumerate(tensors)]
    want, want_grads = _run(op, backend, cast, op.differentiable)
    leaves = [t.clone().requires_grad_(i in op.differentiable) for i, t in enumerate(tensors)]
    with torch.autocast(device, dtype=dtype):
        got = _outputs(op.call(backend, *leaves))
    _weighted_sum(got).backward()
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and torch.equal(g.detach(), w)
    for i in op.differentiable:
        assert leaves[i].grad.dtype == torch.float32, op.names[i]
        assert torch.equal(leaves[i].grad, want_grads[i].float()), op.names[i]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(AUTOCAST_CAST))
def test_matmul_ops_cast_their_operands_under_autocast(name, backend):
    """(fp16 on CPU: the Triton interpreter's bf16 dots are wrong; the cast is the same for any autocast dtype.)"""
    _check_autocast(name, backend, "cpu", torch.float16)


@pytest.mark.parametrize("name", list(AUTOCAST_CAST))
def test_float64_operands_stay_float64_under_autocast(name):
    op = OPS[name]
    tensors = [t.double() if t.is_floating_point() else t for t in op.tensors()]
    want, _ = _run(op, "torch", tensors, ())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = _run(op, "torch", tensors, ())
    assert all(g.dtype == torch.float64 and torch.equal(g, w) for g, w in zip(got, want, strict=True))


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(AUTOCAST_CAST))
def test_gpu_matmul_ops_cast_their_operands_under_autocast(name):
    _check_autocast(name, "triton", "cuda", torch.bfloat16)


# ------------------------------------------------------------------------------------------------ devices
TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")


@pytest.mark.gpu
@TWO_GPUS
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(OPS))
def test_gpu_triton_path_runs_on_the_inputs_device(name, dtype):
    """Tensors on cuda:1 while cuda:0 is current: the same outputs and gradients as on cuda:0, on cuda:1, with the
    current device left as it was (Triton launched on the current device and failed: "Pointer argument cannot be
    accessed from Triton")."""
    op = OPS[name]
    results = []
    for device in ("cuda:0", "cuda:1"):
        tensors = [  # the differentiable inputs in dtype (inv_freq stays fp32)
            t.to(device, dtype) if i in op.differentiable else t.to(device) for i, t in enumerate(op.tensors(seed=1))
        ]
        with torch.cuda.device(0):
            outputs, grads = _run(op, "triton", tensors, op.differentiable)
            assert torch.cuda.current_device() == 0
        assert {str(t.device) for t in outputs} == {device}
        results.append([t.cpu() for t in outputs + [g for g in grads if g is not None]])
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))
