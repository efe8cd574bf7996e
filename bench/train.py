"""Whole training steps (forward, backward, AdamW step) on real model shapes with random weights.

Providers, side by side in one process, on the same random 8192-token sequence (one document per step):

- ``veofast``: our model, all fast paths (``ops_backend="auto"``: Triton on CUDA);
- ``veofast-torch``: our model on the plain-torch references (``ops_backend="torch"``);
- ``veofast-compile``: ``veofast`` with each decoder layer under ``torch.compile`` (``--train.compile``); only when
  asked for in ``--providers`` (the compilation takes a minute);
- ``transformers``: ``AutoModelForCausalLM.from_config(..., attn_implementation="sdpa")``, its own torch loss;
- ``transformers+veofast``: the same with ``veofast.integrations.transformers.apply_veofast_ops`` (our RMSNorm,
  SwiGLU, experts and varlen attention swapped into the instance) and ``causal_lm_loss`` (fused linear CE);
- ``transformers+liger``: the same with liger-kernel's ``apply_liger_kernel_to_<family>(model=...)``, when it imports.
  Liger also rebinds functions of transformers' modeling module (RoPE), so it always runs last for a model family.

Precision. transformers providers: fp32 master weights, bf16 ``torch.autocast``, fused AdamW (as in ANCHORS.md).
veofast providers: fp32 master weights and bf16 compute through the engine's own path from
``build_parallelize_model``, as ``tasks/train.py`` trains: on one GPU each decoder layer (and the root) casts its
fp32 parameters to bf16 for its forward, gradients come back in fp32 (``veofast.distributed.mixed_precision``); on
several GPUs FSDP2 ``MixedPrecisionPolicy`` (bf16 params, fp32 gradient reduction); and the engine's AdamW
(``build_optimizer``: one Triton pass per tensor), without autocast (each layer's own cast replaces it; under
autocast veofast's matmul ops would cast their operands as ``F.linear`` does, ``casts_like_autocast``).

Every step: forward + loss, backward, optimizer step, zero_grad; steps are timed with a device sync after each one;
the median of the timed steps after warm-up is reported. Tokens/s per GPU = sequence length / median step time.
MFU = ``veofast.utils.flops.training_flops(config, [8192])`` (6 * matmul params * tokens + 6 * layers * heads *
head_dim * T^2 per sequence; matmul params = all Linear weights incl. the LM head, active experts only) / step time /
784 TFLOP/s (the measured bf16 dense matmul rate of one H200). Peak memory = ``torch.cuda.max_memory_allocated`` from
the model's construction to the end of the timed steps (weights, gradients, optimizer state, activations).

Time split (one extra profiled step, ``torch.profiler``): the CUDA kernel time of that step in four classes,
as % of all kernel time. A kernel is classified by the first rule that matches, on its name lower-cased with
everything but letters and digits removed:

1. its own name: attention if it contains flash / fmha / attn / attention / sdpa / scaleddotproduct; loss if
   crossentropy / logsoftmax / nllloss / cerows; moe if moe / expert / groupedmm / groupedgemm;
2. else the names of the CPU ops that launched it (the op and its ancestors, e.g. ``aten::_grouped_mm``,
   ``veofast::varlen_attention_fwd``, ``LigerFusedLinearCrossEntropyFunction``), with the same words, plus two
   labels this script puts around module calls while profiling: ``veofast_bench::loss`` around the ``lm_head``
   module and ``veofast_bench::moe`` around every ``*Experts`` module;
3. else, in backward, the class of the forward op that created the autograd node (same sequence number);
4. else rest (projections and MLP GEMMs, norms, RoPE, router, optimizer, FSDP copies, ...).
So "loss" includes the LM-head GEMMs (inside fused losses, or under the ``lm_head`` label), "moe" the expert GEMMs,
permutations and their SwiGLU, "attention" only the attention core (not the q/k/v/o projections).

    python bench/train.py --quick                                   # one GPU, ~3-5 minutes
    python bench/train.py [--models dense,moe] [--providers veofast,transformers] [--moe-layers 4,8]
    torchrun --nproc_per_node=2 bench/train.py --fsdp [--quick]     # veofast FSDP2 on N GPUs, per-GPU tokens/s

Each provider runs in a try block: an error or OOM is recorded in its row and the next provider runs. Results go to
``bench/results/train.jsonl`` (rank 0 only). ``--fsdp`` compares with the newest 1-GPU row of the same model in that
file (target: >= 1.9x the 1-GPU tokens/s in total on 2 GPUs).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import re
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import H200_BF16_TFLOPS, output_dir, print_table, record  # noqa: E402
from veofast.distributed.parallel_state import get_parallel_state, init_parallel_state  # noqa: E402
from veofast.models import DecoderConfig  # noqa: E402
from veofast.utils.flops import matmul_params, training_flops  # noqa: E402

SUITE = "train"
SEQ_LEN = 8192
LR = 1e-5
PROVIDERS = (
    "veofast",
    "veofast-torch",
    "veofast-compile",
    "transformers",
    "transformers+veofast",
    "transformers+liger",
)
# What runs without --providers: every provider but the compiled one.
DEFAULT_PROVIDERS = tuple(p for p in PROVIDERS if p != "veofast-compile")

# Llama-3.2-1B-shaped (RoPE without the llama3 scaling: it does not change the cost).
LLAMA_1B = dict(
    model_type="llama",
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    tie_word_embeddings=True,
    rms_norm_eps=1e-5,
    max_position_embeddings=131072,
    rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
)
# Qwen3-30B-A3B-shaped, with fewer layers (num_hidden_layers is set per run).
QWEN3_MOE = dict(
    model_type="qwen3_moe",
    vocab_size=151936,
    hidden_size=2048,
    intermediate_size=6144,
    num_hidden_layers=4,
    num_attention_heads=32,
    num_key_value_heads=4,
    head_dim=128,
    num_experts=128,
    num_experts_per_tok=8,
    moe_intermediate_size=768,
    norm_topk_prob=True,
    output_router_logits=False,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    tie_word_embeddings=False,
    rms_norm_eps=1e-6,
    max_position_embeddings=40960,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
)

TABLE_COLUMNS = [
    "model",
    "provider",
    "world_size",
    "ep_size",
    "step_ms",
    "tokens_per_s_per_gpu",
    "mfu_pct",
    "peak_gib",
    "attention_pct",
    "loss_pct",
    "moe_pct",
    "rest_pct",
    "loss_first",
    "error",
]


# ------------------------------------------------------------------------------------------------------ helpers
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _print(*args) -> None:
    if _is_main():
        print(*args, flush=True)


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class Batch:
    """One packed sequence: ``input_ids``, ``labels``, ``position_ids`` (1, T); ``cu_seqlens`` (2,) int32."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    seq_len: int


def make_batch(vocab_size: int, seq_len: int, device: torch.device, *, seed: int = 0) -> Batch:
    """Random tokens (never all the same), labels = tokens (the models shift them), one document of ``seq_len``."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (1, seq_len), generator=gen).to(device)
    return Batch(
        input_ids=input_ids,
        labels=input_ids.clone(),
        position_ids=torch.arange(seq_len, device=device).unsqueeze(0),
        cu_seqlens=torch.tensor([0, seq_len], dtype=torch.int32, device=device),
        seq_len=seq_len,
    )


@dataclass
class Runner:
    """A built provider: ``loss_fn()`` runs the forward and returns the loss; ``step()`` is one training step."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: Callable[[], torch.Tensor]
    precision: str
    notes: str = ""

    def step(self) -> torch.Tensor:
        loss = self.loss_fn()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------------- providers
def build_veofast(hf: dict, backend: str, batch: Batch, device: torch.device, *, compiled: bool = False) -> Runner:
    """veofast's CausalLM on the meta device, sharded and materialised by ``build_parallelize_model`` (FSDP2 with
    bf16 mixed precision on CUDA; each decoder layer under torch.compile with ``compiled``), with the engine's
    AdamW."""
    from veofast.distributed.torch_parallelize import build_parallelize_model
    from veofast.models import build_foundation_model
    from veofast.optim import build_optimizer

    ps = get_parallel_state()
    model = build_foundation_model(config_overrides=hf, init_device="meta", ops_backend=backend, seed=0)
    model = build_parallelize_model(
        model,
        enable_full_shard=ps.world_size > 1,
        enable_mixed_precision=True,
        enable_compile=compiled,
        init_device="meta",
        seed=0,
    )
    model.train()
    optimizer = build_optimizer(model, lr=LR)
    seq_len = batch.seq_len

    def loss_fn() -> torch.Tensor:
        out = model(
            batch.input_ids,
            batch.labels,
            position_ids=batch.position_ids,
            cu_seqlens=batch.cu_seqlens,
            max_seqlen=seq_len,
        )
        return out.loss

    precision = (
        (
            f"fp32 master + bf16 compute (FSDP2 mixed precision, {ps.world_size}-rank mesh)"
            if ps.world_size > 1
            else "fp32 master + bf16 compute (per-layer bf16 casts, fp32 gradients; no FSDP on one rank)"
        )
        if device.type == "cuda"
        else "fp32"
    )
    return Runner(model, optimizer, loss_fn, precision)


def _apply_liger(model: nn.Module) -> str:
    """Patch liger-kernel into this transformers instance (its ``apply_liger_kernel_to_<family>(model=...)``)."""
    import liger_kernel.transformers as liger

    model_type = model.config.model_type
    apply = getattr(liger, f"apply_liger_kernel_to_{model_type}", None)
    if apply is None:
        raise RuntimeError(f"liger-kernel has no apply_liger_kernel_to_{model_type}")
    apply(model=model)
    try:
        from importlib.metadata import version

        return f"liger-kernel {version('liger-kernel')}"
    except Exception:  # metadata missing (e.g. a bare PYTHONPATH copy): the version is only a note
        return "liger-kernel (version unknown)"


def build_transformers(hf: dict, mode: str, batch: Batch, device: torch.device) -> Runner:
    """The transformers model of ``hf`` (fp32 weights on ``device``, sdpa attention), trained under bf16 autocast.

    ``mode``: ``"torch"`` (as is), ``"veofast"`` (``apply_veofast_ops`` + ``causal_lm_loss``) or ``"liger"``.
    """
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    from veofast.optim import build_optimizer

    fields = dict(hf)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    model.to(device).train()
    notes = f"transformers {transformers.__version__}"
    experts = getattr(model.config, "_experts_implementation", None)
    if experts is not None and hf.get("num_experts"):
        notes += f", experts_implementation={experts}"
    if mode == "veofast":
        from veofast.integrations.transformers import apply_veofast_ops

        notes += f", veofast swapped {apply_veofast_ops(model)}"
    elif mode == "liger":
        notes += ", " + _apply_liger(model)
    elif mode != "torch":
        raise ValueError(f"build_transformers: mode must be torch, veofast or liger, got {mode!r}")
    optimizer = build_optimizer(model, lr=LR)

    def loss_fn() -> torch.Tensor:
        with _autocast(device):
            if mode == "veofast":
                from veofast.integrations.transformers import causal_lm_loss

                return causal_lm_loss(
                    model,
                    batch.input_ids,
                    batch.labels,
                    position_ids=batch.position_ids,
                    cu_seqlens=batch.cu_seqlens,
                    max_seqlen=batch.seq_len,
                )
            return model(input_ids=batch.input_ids, labels=batch.labels, use_cache=False).loss

    precision = "fp32 master + bf16 autocast" if device.type == "cuda" else "fp32"
    return Runner(model, optimizer, loss_fn, precision, notes)


def build_runner(provider: str, hf: dict, batch: Batch, device: torch.device) -> Runner:
    if provider == "veofast":
        return build_veofast(hf, "auto", batch, device)
    if provider == "veofast-torch":
        return build_veofast(hf, "torch", batch, device)
    if provider == "veofast-compile":
        return build_veofast(hf, "auto", batch, device, compiled=True)
    if provider == "transformers":
        return build_transformers(hf, "torch", batch, device)
    if provider == "transformers+veofast":
        return build_transformers(hf, "veofast", batch, device)
    if provider == "transformers+liger":
        return build_transformers(hf, "liger", batch, device)
    raise ValueError(f"unknown provider {provider!r}; choose from {PROVIDERS}")


# --------------------------------------------------------------------------------------------------- time split
_RULES = (
    ("attention", ("flash", "fmha", "attn", "attention", "sdpa", "scaleddotproduct")),
    ("loss", ("crossentropy", "logsoftmax", "nllloss", "cerows", "veofastbenchloss")),
    ("moe", ("moe", "expert", "groupedmm", "groupedgemm")),
)
SPLIT_CLASSES = ("attention", "loss", "moe", "rest")
_BACKWARD_PREFIX = "autograd::engine::evaluate_function"


def classify_name(name: str) -> str | None:
    """attention / loss / moe when ``name`` (a kernel or op name) matches a rule of the module docstring, else None."""
    key = re.sub(r"[^a-z0-9]", "", name.lower())
    for cls, words in _RULES:
        if any(w in key for w in words):
            return cls
    return None


def _label_hooks(model: nn.Module) -> list:
    """Put ``record_function("veofast_bench::loss" / "::moe")`` around lm_head / *Experts module calls."""
    handles = []
    for name, module in model.named_modules():
        if name.split(".")[-1] == "lm_head":
            label = "veofast_bench::loss"
        elif type(module).__name__.endswith("Experts"):
            label = "veofast_bench::moe"
        else:
            continue
        stack: list = []

        def pre(_module, _args, label=label, stack=stack):
            ctx = torch.autograd.profiler.record_function(label)
            ctx.__enter__()
            stack.append(ctx)

        def post(_module, _args, _output, stack=stack):
            if stack:
                stack.pop().__exit__(None, None, None)

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))
    return handles


def time_split(events, *, use_kernels: bool) -> dict[str, float]:
    """Microseconds per class (``SPLIT_CLASSES``) from profiler events (the rules of the module docstring).

    ``use_kernels``: sum the CUDA kernels launched by each CPU op; else (CPU runs) the ops' self CPU time.
    """
    cpu_events = [e for e in events if str(e.device_type).endswith("CPU")]
    by_name: dict[int, str | None] = {}

    def chain_class(event, seq_labels: dict | None) -> str | None:
        """The class of the first event on the way up (self, parent, ...) whose name -- or, for a backward node,
        the forward op of the same sequence number -- is classified."""
        node = event
        while node is not None:
            key = id(node)
            if key not in by_name:
                by_name[key] = classify_name(node.name)
            if by_name[key] is not None:
                return by_name[key]
            if seq_labels is not None and node.name.startswith(_BACKWARD_PREFIX) and node.sequence_nr >= 0:
                label = seq_labels.get(node.sequence_nr)
                if label is not None:
                    return label
            node = node.cpu_parent
        return None

    def in_backward(event) -> bool:
        node = event
        while node is not None:
            if node.name.startswith(_BACKWARD_PREFIX):
                return True
            node = node.cpu_parent
        return False

    seq_labels: dict[int, str] = {}
    for e in cpu_events:
        if e.sequence_nr >= 0 and e.sequence_nr not in seq_labels and not in_backward(e):
            label = chain_class(e, None)
            if label is not None:
                seq_labels[e.sequence_nr] = label

    totals = dict.fromkeys(SPLIT_CLASSES, 0.0)
    if use_kernels:
        for e in cpu_events:
            kernels = getattr(e, "kernels", None) or []
            if not kernels:
                continue
            op_class = chain_class(e, seq_labels)
            for k in kernels:
                totals[classify_name(k.name) or op_class or "rest"] += float(k.duration)
        if sum(totals.values()) == 0:  # kernels not linked to ops: classify device events by their names only
            for e in events:
                if str(e.device_type).endswith("CUDA"):
                    totals[classify_name(e.name) or "rest"] += float(e.time_range.elapsed_us())
    else:
        for e in cpu_events:
            totals[chain_class(e, seq_labels) or "rest"] += float(e.self_cpu_time_total)
    return totals


def profile_split(runner: Runner, device: torch.device, steps: int = 1) -> dict[str, float]:
    """Profile ``steps`` training steps; returns ``{class}_pct`` (% of kernel time) and ``profiled_kernel_ms``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    handles = _label_hooks(runner.model)
    try:
        with profile(activities=activities) as prof:
            for _ in range(steps):
                runner.step()
            _sync(device)
    finally:
        for h in handles:
            h.remove()
    totals = time_split(prof.events(), use_kernels=device.type == "cuda")
    total = sum(totals.values())
    out = {f"{cls}_pct": (100.0 * v / total if total else None) for cls, v in totals.items()}
    out["profiled_kernel_ms"] = total / 1e3 / steps
    return out


# ---------------------------------------------------------------------------------------------------- measuring
def benchmark_provider(
    model_name: str,
    hf: dict,
    provider: str,
    *,
    device: torch.device,
    seq_len: int = SEQ_LEN,
    warmup: int = 2,
    steps: int = 8,
    profile_steps: int = 1,
) -> dict:
    """Build ``provider`` for the model of HF config dict ``hf`` and time its training steps.

    Returns the result row (also on failure: ``error`` then says what went wrong, e.g. "OOM"). Call
    ``init_parallel_state`` first (veofast providers shard through it). Timings are the max over ranks.
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    config = DecoderConfig.from_hf_dict(hf)
    flops = training_flops(config, [seq_len])
    row: dict = {
        "model": model_name,
        "provider": provider,
        "layers": config.num_hidden_layers,
        "seq_len": seq_len,
        "world_size": world,
        "ep_size": get_parallel_state().ep_size,
        "warmup": warmup,
        "steps": steps,
        "matmul_params": matmul_params(config),
        "flops_per_seq": flops,
    }
    rank = dist.get_rank() if dist.is_initialized() else 0
    batch = make_batch(config.vocab_size, seq_len, device, seed=rank)
    if device.type == "cuda":
        _free_memory()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        runner = build_runner(provider, hf, batch, device)
        row["precision"] = runner.precision
        row["notes"] = runner.notes
        row["params"] = sum(p.numel() for p in runner.model.parameters())  # a DTensor counts its global size
        losses = [runner.step().float()]
        for _ in range(warmup - 1):
            runner.step()
        _sync(device)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            loss = runner.step()
            _sync(device)
            times.append(time.perf_counter() - start)
        losses.append(loss.float())
        step_s = statistics.median(times)
        if dist.is_initialized() and world > 1:
            t = torch.tensor([step_s], device=device, dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            step_s = t.item()
        row["loss_first"], row["loss_last"] = (x.item() for x in losses)
        row["step_ms"] = 1e3 * step_s
        row["step_ms_min"], row["step_ms_max"] = 1e3 * min(times), 1e3 * max(times)
        row["tokens_per_s_per_gpu"] = seq_len / step_s
        row["tokens_per_s"] = world * seq_len / step_s
        if device.type == "cuda":
            row["mfu_pct"] = 100.0 * flops / step_s / (H200_BF16_TFLOPS * 1e12)
            row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        if not math.isfinite(row["loss_first"]) or not math.isfinite(row["loss_last"]):
            row["error"] = f"non-finite loss: first {row['loss_first']}, last {row['loss_last']}"
        if profile_steps > 0:
            try:
                row.update(profile_split(runner, device, profile_steps))
            except Exception as exc:  # the split is a diagnostic: its failure does not void the timing
                row["profile_error"] = f"{type(exc).__name__}: {exc}"[:300]
                _print(f"note: {model_name} / {provider}: profiling failed:\n{traceback.format_exc()}")
    except torch.cuda.OutOfMemoryError:
        row["error"] = "OOM"
        _print(f"note: {model_name} / {provider}: out of memory")
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"[:500]
        _print(f"note: {model_name} / {provider} failed:\n{traceback.format_exc()}")
    runner = None  # noqa: F841  (drop the model and optimizer before the next provider)
    _free_memory()
    return row


# ---------------------------------------------------------------------------------------------------- the plan
def moe_config(layers: int) -> dict:
    return {**QWEN3_MOE, "num_hidden_layers": layers}


def build_plan(args) -> list[tuple[str, dict, str]]:
    """(model name, HF config dict, provider) in run order: liger last per family (it patches module functions),
    ``veofast-torch`` last for MoE in --quick (its per-expert loop is the slowest; the time budget may skip it)."""
    providers = [p for p in args.providers.split(",") if p]
    unknown = sorted(set(providers) - set(PROVIDERS))
    if unknown:
        raise SystemExit(f"--providers: unknown {unknown}; choose from {PROVIDERS}")
    if args.fsdp and any(not p.startswith("veofast") for p in providers):
        raise SystemExit("--fsdp runs the veofast providers only (transformers models are not sharded here)")
    plan = []
    models = [m for m in args.models.split(",") if m]
    for m in models:
        if m not in ("dense", "moe"):
            raise SystemExit(f"--models: unknown {m!r}; choose from dense, moe")
    if "dense" in models:
        order = [
            "veofast",
            "veofast-compile",
            "veofast-torch",
            "transformers",
            "transformers+veofast",
            "transformers+liger",
        ]
        plan += [("llama-3.2-1b", LLAMA_1B, p) for p in order if p in providers]
    if "moe" in models:
        order = ["veofast", "veofast-compile", "transformers", "transformers+veofast", "transformers+liger"]
        order.insert(len(order) if args.quick else 2, "veofast-torch")
        for layers in (int(x) for x in args.moe_layers.split(",") if x):
            plan += [(f"qwen3-30b-a3b-{layers}l", moe_config(layers), p) for p in order if p in providers]
    return plan


def one_gpu_reference(row: dict) -> dict | None:
    """The newest 1-GPU row of the same model and provider on this GPU in ``train.jsonl`` (for --fsdp)."""
    path = output_dir() / f"{SUITE}.jsonl"
    if not path.exists():
        return None
    best = None
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    with open(path) as f:
        for line in f:
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if (
                r.get("world_size") == 1
                and r.get("model") == row["model"]
                and r.get("provider") == row["provider"]
                and r.get("seq_len") == row["seq_len"]
                and r.get("device") == device
                and not r.get("error")
                and r.get("tokens_per_s")
            ):
                best = r
    return best


def _init_distributed(args) -> torch.device:
    """torchrun (--fsdp): NCCL with a bounded timeout, so a rank that failed alone cannot hang the others forever;
    otherwise a 1-rank group. Then the veofast parallel state (FSDP2 over all ranks)."""
    if args.fsdp:
        if "WORLD_SIZE" not in os.environ:
            raise SystemExit("--fsdp: run under torchrun, e.g. torchrun --nproc_per_node=2 bench/train.py --fsdp")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", timeout=timedelta(seconds=args.nccl_timeout))
    init_parallel_state(dp_mode="fsdp2", ep_size=args.ep)
    return get_parallel_state().device


def _over_budget(start: float, budget: float) -> bool:
    """Whether the time budget is spent, decided on rank 0 and shared, so that all ranks skip together."""
    flag = torch.tensor([1.0 if time.perf_counter() - start > budget else 0.0])
    if dist.is_initialized() and dist.get_world_size() > 1:
        flag = flag.to(get_parallel_state().device)
        dist.broadcast(flag, src=0)
    return bool(flag.item())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1B dense + MoE 4 layers, 2 warm-up + 8 timed steps")
    parser.add_argument("--fsdp", action="store_true", help="under torchrun: veofast FSDP2 over all ranks")
    parser.add_argument("--models", default="dense,moe", help="comma-separated subset of dense,moe")
    parser.add_argument("--providers", default=None, help=f"comma-separated subset of {PROVIDERS}")
    parser.add_argument("--moe-layers", default=None, help="MoE layer counts to run (default 4; full run: 4,8)")
    parser.add_argument("--seq-len", type=int, default=SEQ_LEN)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="timed steps (>= 8)")
    parser.add_argument("--profile-steps", type=int, default=1, help="profiled steps for the time split (0: off)")
    parser.add_argument("--time-budget", type=float, default=None, help="seconds; later providers are skipped")
    parser.add_argument("--nccl-timeout", type=int, default=300, help="seconds (--fsdp)")
    parser.add_argument("--ep", type=int, default=1, help="expert-parallel size (--fsdp, MoE models only)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/train.py needs a CUDA GPU (tests/engine/test_bench_train.py runs its core on CPU)")
    if args.providers is None:
        args.providers = "veofast" if args.fsdp else ",".join(DEFAULT_PROVIDERS)
    if args.ep > 1 and (not args.fsdp or args.models != "moe"):
        raise SystemExit("--ep > 1 needs --fsdp and --models moe (expert parallelism of the veofast MoE model)")
    if args.moe_layers is None:
        args.moe_layers = "4" if args.quick or args.fsdp else "4,8"
    warmup = args.warmup if args.warmup is not None else (2 if args.quick else 3)
    steps = args.steps if args.steps is not None else (8 if args.quick else 12)
    budget = args.time_budget if args.time_budget is not None else (300.0 if args.quick else 540.0)
    if steps < 8:
        _print(f"note: --steps {steps} < 8: medians of fewer than 8 steps are noisy")

    start = time.perf_counter()
    device = _init_distributed(args)
    world = dist.get_world_size()
    plan = build_plan(args)
    _print(
        f"bench/train.py on {world} x {torch.cuda.get_device_name()}: {len(plan)} runs, {args.seq_len} tokens per "
        f"GPU per step, {warmup} warm-up + {steps} timed steps, time budget {budget:.0f} s; MFU against "
        f"{H200_BF16_TFLOPS} TFLOP/s (H200 bf16 dense matmul)"
    )
    rows = []
    for model_name, hf, provider in plan:
        if _over_budget(start, budget):
            row = {
                "model": model_name,
                "provider": provider,
                "world_size": world,
                "seq_len": args.seq_len,
                "error": f"skipped: time budget {budget:.0f} s spent",
            }
            _print(f"note: {model_name} / {provider} skipped: the time budget of {budget:.0f} s is spent")
            rows.append(row)
            continue
        t0 = time.perf_counter()
        row = benchmark_provider(
            model_name,
            hf,
            provider,
            device=device,
            seq_len=args.seq_len,
            warmup=warmup,
            steps=steps,
            profile_steps=args.profile_steps,
        )
        row["wall_s"] = time.perf_counter() - t0
        if args.fsdp and not row.get("error"):
            ref = one_gpu_reference(row)
            if ref is not None:
                row["one_gpu_tokens_per_s"] = ref["tokens_per_s"]
                row["scaling_vs_1gpu"] = row["tokens_per_s"] / ref["tokens_per_s"]
        if _is_main():
            row = record(SUITE, row)
            _print(
                f"{model_name} / {provider}: "
                + ", ".join(
                    f"{k}={row[k]:.4g}" if isinstance(row.get(k), float) else f"{k}={row.get(k)}"
                    for k in ("step_ms", "tokens_per_s_per_gpu", "mfu_pct", "peak_gib", "loss_first", "wall_s", "error")
                    if k in row
                )
            )
        rows.append(row)

    _print(
        f"\nwhole training steps, {args.seq_len} tokens per GPU per step, median of {steps} steps; "
        f"MFU = training_flops / step time / {H200_BF16_TFLOPS} TFLOP/s; split = % of profiled CUDA kernel time"
    )
    _print(
        "precision: transformers = fp32 master + bf16 autocast; veofast = fp32 master + bf16 compute through "
        "per-layer bf16 casts on one GPU, FSDP2 mixed precision on several; transformers: torch's fused AdamW, "
        "veofast: its Triton AdamW"
    )
    if _is_main():
        print_table(rows, TABLE_COLUMNS)
        for row in rows:
            if row.get("notes"):
                print(f"  {row['model']} / {row['provider']}: {row['notes']}")
        if args.fsdp:
            for row in rows:
                if "scaling_vs_1gpu" in row:
                    print(
                        f"scaling {row['model']} / {row['provider']}: {world} GPUs give "
                        f"{row['tokens_per_s']:.0f} tokens/s in total = {row['scaling_vs_1gpu']:.2f}x the 1-GPU "
                        f"{row['one_gpu_tokens_per_s']:.0f} (target >= {0.95 * world:.2f}x)"
                    )
                elif not row.get("error"):
                    print(
                        f"scaling {row['model']}: no 1-GPU row in {output_dir() / 'train.jsonl'} to compare "
                        "with; run python bench/train.py --quick first"
                    )
    print(f"total wall time {time.perf_counter() - start:.0f} s") if _is_main() else None
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
