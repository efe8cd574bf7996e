"""Expert-parallel checks in one torchrun launch (CPU, gloo, ep_size=2, world 2 or 4); rank 0 writes JSON.

Usage: torchrun --nproc_per_node=N ep_worker.py OUT_JSON TMP_DIR [steps=3]

Sections of the JSON:
- ``errors``: messages of the errors for experts that do not divide by ep_size (raised on rank 0 alone, so a
  collective before the check would hang the run instead of passing);
- ``dispatch``: per dispatch (all-to-all, all-gather) and routing case, max abs differences (float64) between
  the dispatcher and ``moe_ffn_reference`` on the EP group's tokens: outputs, grads of hidden, topk_weights and
  this rank's expert weights. Cases include experts that receive no tokens and a rank that receives no rows at
  all; ranks hold different token counts;
- ``bad_ids`` / ``strategies``: the out-of-range id errors of every rank per dispatch; what ``"auto"`` picks;
- ``hf``: per model config, whether load_hf_weights into the EP model and save_hf_weights out of it round-trip
  a checkpoint exactly, and the expert parameters' placements;
- ``train``: ``steps`` optimizer steps of the tiny MoE model of train_steps_worker.py (same global batches).
"""

import functools
import itertools
import json
import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from train_steps_worker import TINY, global_batch

from veofast.distributed.expert_parallel import ExpertParallelDispatcher
from veofast.distributed.parallel_state import init_parallel_state
from veofast.distributed.torch_parallelize import build_parallelize_model
from veofast.models import build_foundation_model
from veofast.models.hf_io import save_hf_weights
from veofast.ops import moe_ffn_reference
from veofast.optim import build_lr_scheduler, build_optimizer
from veofast.train_step import train_step
from veofast.utils.helper import exit_process

EP_SIZE = 2
MOE = TINY["qwen3_moe"]
DISPATCHES = ("alltoall", "allgather")
CASES = ("random", "idle_rank", "empty_experts", "all_remote", "one_local_expert")


def check_errors(ps) -> list[str]:
    """Rank 0 alone builds an EP model with 3 experts (and a dispatcher for them): both must raise ValueError."""
    messages = []
    if ps.global_rank == 0:
        model = build_foundation_model(config_overrides={**MOE, "num_experts": 3}, ops_backend="torch")
        for make in (lambda: build_parallelize_model(model), lambda: ExpertParallelDispatcher(3, ps.ep_group)):
            try:
                make()
                messages.append("no error")
            except ValueError as exc:
                messages.append(str(exc))
    dist.barrier()
    return messages


def check_bad_ids(ps) -> dict[str, list[str]]:
    """EP rank 1 routes a slot to expert 4 of 4: with either dispatch, every rank of every EP group must raise
    the same ValueError (naming that rank) after the count (or id) exchange, before any row reaches an expert.
    Returns the messages of all ranks per dispatch."""
    report = {}
    for dispatch in DISPATCHES:
        dispatcher = ExpertParallelDispatcher(4, ps.ep_group, dispatch=dispatch)
        ids = torch.tensor([[0, 2], [1, 3], [3, 0]])
        if ps.ep_rank == 1:
            ids[1, 0] = 4
        weights, hidden = torch.full((3, 2), 0.5), torch.randn(3, 8)
        try:
            dispatcher(hidden, ids, weights, torch.randn(2, 12, 8), torch.randn(2, 8, 6), backend="torch")
            message = "no error"
        except ValueError as exc:
            message = str(exc)
        messages = [None] * ps.world_size
        dist.all_gather_object(messages, message)
        report[dispatch] = messages
    return report


def check_strategies(ps) -> dict[str, str]:
    """What each dispatch setting resolves to, and the errors of bad settings."""
    gather = ExpertParallelDispatcher(4, ps.ep_group)
    report = {
        "auto_e4_top2": gather.strategy(2),
        "auto_e128_top8": ExpertParallelDispatcher(128, ps.ep_group).strategy(8),
    }
    report["auto_e64_top1"] = ExpertParallelDispatcher(64, ps.ep_group).strategy(1)
    try:
        ExpertParallelDispatcher(4, ps.ep_group, dispatch="ring")
        report["bad_mode"] = "no error"
    except ValueError as exc:
        report["bad_mode"] = str(exc)
    return report


def _routing(case: str, num_tokens: int, rank: int, generator: torch.Generator) -> torch.Tensor:
    """``topk_ids (T, 2)`` of 4 experts (ranks 0/1 of an EP pair own experts {0, 1} / {2, 3}), or ``(T, 1)`` of
    2 experts for ``one_local_expert``."""
    if case == "one_local_expert":
        return torch.randint(0, 2, (num_tokens, 1), generator=generator)
    if case == "random":
        return torch.stack([torch.randperm(4, generator=generator)[:2] for _ in range(num_tokens)])
    if case == "idle_rank":  # only experts of EP rank 0: EP rank 1 receives no rows
        return torch.stack([torch.randperm(2, generator=generator) for _ in range(num_tokens)])
    if case == "empty_experts":  # experts 1 and 3 get nothing
        return torch.tensor([[0, 2], [2, 0]]).repeat(num_tokens, 1)[:num_tokens]
    if case == "all_remote":  # every token goes to the other EP rank's experts
        own = rank % EP_SIZE
        return torch.stack([torch.randperm(2, generator=generator) + 2 * (1 - own) for _ in range(num_tokens)])
    raise ValueError(case)


def side_term(hidden: torch.Tensor) -> torch.Tensor:
    """What a shared expert adds: a differentiable function of the tokens, computed under the combine."""
    return torch.tanh(hidden) * 0.5


def check_dispatch(ps) -> dict:
    """Dispatcher (with a ``side`` term, as a shared expert adds) vs the float64 reference for every routing case,
    uneven token counts per rank: the torch path in float64, the Triton path in float32 (keys
    ``"<dispatch>:<backend>:<case>"``)."""
    hidden_size, inter = 8, 6
    group_ranks = [ps.global_rank - ps.ep_rank + i for i in range(EP_SIZE)]
    results = {}
    for dispatch, case in itertools.product(DISPATCHES, CASES):
        num_experts, topk = (2, 1) if case == "one_local_expert" else (4, 2)
        local = num_experts // EP_SIZE
        dispatcher = ExpertParallelDispatcher(num_experts, ps.ep_group, dispatch=dispatch)
        generator = torch.Generator().manual_seed(7)
        gate_up = torch.randn(num_experts, 2 * inter, hidden_size, generator=generator, dtype=torch.float64) * 0.3
        down = torch.randn(num_experts, hidden_size, inter, generator=generator, dtype=torch.float64) * 0.3
        gate_up.requires_grad_(True)
        down.requires_grad_(True)
        inputs = {}
        for rank in range(ps.world_size):  # every rank draws every rank's inputs (same generator)
            tokens = [5, 3, 4, 2][rank]  # uneven: the all-gather pads
            hidden = torch.randn(tokens, hidden_size, generator=generator, dtype=torch.float64)
            ids = _routing(case, tokens, rank, generator)
            weights = torch.rand(tokens, topk, generator=generator, dtype=torch.float64)
            grad_out = torch.randn(tokens, hidden_size, generator=generator, dtype=torch.float64)
            inputs[rank] = [hidden.requires_grad_(True), ids, weights.requires_grad_(True), grad_out]
        # reference: the EP group's tokens through the full experts
        ref_loss = sum(
            ((moe_ffn_reference(h, i, w, gate_up, down) + side_term(h)) * g).sum()
            for h, i, w, g in (inputs[r] for r in group_ranks)
        )
        ref_loss.backward()
        hidden, ids, weights, grad_out = inputs[ps.global_rank]
        ref = {
            "out": (moe_ffn_reference(hidden, ids, weights, gate_up, down) + side_term(hidden)).detach(),
            "hidden": hidden.grad.clone(),
            "weights": weights.grad.clone(),
            "gate_up": gate_up.grad[ps.ep_rank * local : (ps.ep_rank + 1) * local],
            "down": down.grad[ps.ep_rank * local : (ps.ep_rank + 1) * local],
        }
        # expert parallel: this rank's slices of the weights; the torch path in float64, the Triton kernels (under
        # the interpreter on CPU) in float32
        for backend, dtype in (("torch", torch.float64), ("triton", torch.float32)):
            rows = slice(ps.ep_rank * local, (ps.ep_rank + 1) * local)
            local_gate_up = gate_up.detach()[rows].to(dtype).requires_grad_(True)
            local_down = down.detach()[rows].to(dtype).requires_grad_(True)
            leaves = [hidden.detach().to(dtype).requires_grad_(True), weights.detach().to(dtype).requires_grad_(True)]
            side = functools.partial(side_term, leaves[0])
            out = dispatcher(leaves[0], ids, leaves[1], local_gate_up, local_down, backend=backend, side=side)
            (out * grad_out.to(dtype)).sum().backward()
            got = {
                "out": out.detach(),
                "hidden": leaves[0].grad,
                "weights": leaves[1].grad,
                "gate_up": local_gate_up.grad,
                "down": local_down.grad,
            }
            errors = torch.tensor([float((got[k].double() - ref[k]).abs().max()) for k in ref], dtype=torch.float64)
            dist.all_reduce(errors, op=dist.ReduceOp.MAX)
            results[f"{dispatch}:{backend}:{case}"] = dict(zip(ref, errors.tolist(), strict=True))
    return results


def check_hf(ps, tmp_dir: str) -> dict:
    """A checkpoint loaded into the EP model and saved back out of it must be bit-identical, per config."""
    results = {}
    for tag, overrides in (("e4", {}), ("e2_top1", {"num_experts": 2, "num_experts_per_tok": 1})):
        src, dst = os.path.join(tmp_dir, f"src_{tag}"), os.path.join(tmp_dir, f"dst_{tag}")
        config = {**MOE, **overrides}
        plain = build_foundation_model(config_overrides=config, init_device="cpu", ops_backend="torch", seed=5)
        save_hf_weights(plain, src)
        dist.barrier()
        model = build_foundation_model(weights_path=src, config_overrides=config, ops_backend="torch")
        model = build_parallelize_model(model, init_device="meta")
        placements = [str(p) for p in model.model.layers[0].mlp.experts.gate_up_proj.placements]
        same_params = all(
            torch.equal(param.full_tensor(), dict(plain.named_parameters())[name].detach())
            for name, param in model.named_parameters()
        )
        save_hf_weights(model, dst)
        dist.barrier()
        same_files = None
        if ps.global_rank == 0:
            files = sorted(f for f in os.listdir(src) if f.endswith(".safetensors"))
            a = {k: v for f in files for k, v in load_file(os.path.join(src, f)).items()}
            b = {k: v for f in files for k, v in load_file(os.path.join(dst, f)).items()}
            same_files = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        results[tag] = {"placements": placements, "same_params": same_params, "same_files": same_files}
    return results


def train(ps, steps: int) -> list[dict]:
    """The loop of train_steps_worker.py on its tiny MoE model under EP."""
    model = build_foundation_model(config_overrides=MOE, ops_backend="torch")
    config = model.config
    model = build_parallelize_model(model, init_device="meta", seed=0)
    optimizer = build_optimizer(model, lr=1e-2, weight_decay=0.1)
    scheduler = build_lr_scheduler(optimizer, train_steps=10, lr_decay_style="constant")
    results = []
    for step in range(steps):
        micro_batches = global_batch(step, config.vocab_size)[ps.dp_rank :: ps.dp_size]
        result = train_step(model, micro_batches, optimizer, scheduler, config=config, ps=ps, max_grad_norm=1.0)
        results.append(
            {
                "loss": result.loss,
                "aux_loss": result.aux_loss,
                "grad_norm": result.grad_norm,
                "label_tokens": result.label_tokens,
            }
        )
    return results


def main():
    out_path, tmp_dir, *options = sys.argv[1:]
    opts = dict(o.split("=", 1) for o in options)
    ps = init_parallel_state(ep_size=EP_SIZE, device_type="cpu")
    report = {
        "errors": check_errors(ps),
        "dispatch": check_dispatch(ps),
        "bad_ids": check_bad_ids(ps),
        "strategies": check_strategies(ps),
        "hf": check_hf(ps, tmp_dir),
        "train": train(ps, int(opts.get("steps", 3))),
    }
    if ps.global_rank == 0:
        with open(out_path, "w") as f:
            json.dump(report, f)


if __name__ == "__main__":
    code = 0
    try:
        main()
    except Exception:
        import traceback

        traceback.print_exc()
        code = 1
    exit_process(code)
