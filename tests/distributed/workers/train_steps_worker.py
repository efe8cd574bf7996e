"""Run a few optimizer steps of a tiny model on a fixed global batch; rank 0 writes losses and grad norms.

Usage: torchrun ... train_steps_worker.py OUT_JSON MODEL_TYPE [key=value ...]  (keys: dp_mode, init_device,
ep, dispatch, sp, steps, align, ckpt, opt, glb, merge). The global batch of every step is the same whatever the
world size; each data-parallel rank takes its share of the micro-batches (the ranks of a sequence-parallel group
take the same ones, and ``train_step`` gives each its slice of tokens), so losses must match across world sizes.
``align=N`` lengthens the last document of each micro-batch to make its token count a multiple of N (no
sequence-parallel padding); ``ckpt=1`` turns on activation checkpointing; ``opt=triton`` steps with the Triton
AdamW (interpreted on CPU); ``dispatch=alltoall`` makes expert parallelism move tokens by all-to-alls (``auto``
gathers them at this size).
"""

import json
import sys

import torch
from torch.distributed.tensor import DTensor

from veofast.distributed.parallel_state import init_parallel_state
from veofast.distributed.torch_parallelize import build_parallelize_model
from veofast.models import build_foundation_model
from veofast.optim import build_lr_scheduler, build_optimizer
from veofast.train_step import train_step
from veofast.utils.helper import exit_process

TINY = {
    "llama": {"model_type": "llama", "vocab_size": 97, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2},
    "qwen3_moe": {"model_type": "qwen3_moe", "vocab_size": 97, "hidden_size": 32, "intermediate_size": 64,
                  "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "num_experts": 4,
                  "num_experts_per_tok": 2, "moe_intermediate_size": 16, "output_router_logits": True,
                  "router_aux_loss_coef": 0.1},
}


def packed_micro_batch(lengths: list[int], vocab: int, generator: torch.Generator) -> dict:
    """A packed micro-batch of documents with the given lengths, as the packing collator makes it."""
    total = sum(lengths)
    input_ids = torch.randint(0, vocab, (1, total), generator=generator)
    labels = input_ids.clone()
    starts = torch.tensor([0, *lengths]).cumsum(0)
    labels[0, starts[:-1]] = -100
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    return {
        "input_ids": input_ids, "labels": labels, "position_ids": position_ids,
        "cu_seqlens": starts.to(torch.int32), "max_seqlen": max(lengths),
        "num_label_tokens": int((labels != -100).sum()),
    }


def global_batch(step: int, vocab: int, num_micro: int = 4, align: int = 1) -> list[dict]:
    generator = torch.Generator().manual_seed(1000 + step)
    batch = []
    for _ in range(num_micro):
        lengths = torch.randint(1, 40, (3,), generator=generator).tolist()
        lengths[-1] += -sum(lengths) % align
        batch.append(packed_micro_batch(lengths, vocab, generator))
    return batch


def main():
    out_path, model_type, *options = sys.argv[1:]
    opts = dict(o.split("=", 1) for o in options)
    ps = init_parallel_state(
        dp_mode=opts.get("dp_mode", "fsdp2"), ep_size=int(opts.get("ep", 1)), ulysses_size=int(opts.get("sp", 1)),
        device_type="cpu",
    )
    init_device = opts.get("init_device", "meta")
    model = build_foundation_model(config_overrides=TINY[model_type], init_device=init_device, ops_backend="torch")
    config = model.config
    model = build_parallelize_model(
        model, init_device=init_device, seed=0, enable_gradient_checkpointing=opts.get("ckpt") == "1",
        global_load_balancing=opts.get("glb") == "1",
    )
    if "dispatch" in opts:
        for module in model.modules():
            if getattr(module, "dispatcher", None) is not None:
                module.dispatcher.dispatch = opts["dispatch"]
    optimizer = build_optimizer(model, lr=1e-2, weight_decay=0.1, backend=opts.get("opt", "auto"))
    scheduler = build_lr_scheduler(optimizer, train_steps=10, lr_decay_style="constant")
    results = []
    share = ps.dp_rank  # sequence-parallel ranks share their data-parallel rank's micro-batches
    for step in range(int(opts.get("steps", 3))):
        micro_batches = global_batch(step, config.vocab_size, align=int(opts.get("align", 1)))[share::ps.dp_size]
        group = int(opts.get("merge", 1))  # one rank playing `group` ranks: micro-batch i of each in one
        micro_batches = [merge(micro_batches[i:i + group]) for i in range(0, len(micro_batches), group)]
        result = train_step(model, micro_batches, optimizer, scheduler, config=config, ps=ps, max_grad_norm=1.0)
        results.append({"loss": result.loss, "aux_loss": result.aux_loss, "grad_norm": result.grad_norm,
                        "label_tokens": result.label_tokens})
    if ps.dp_mode == "fsdp2" and ps.fsdp_size > 1 and not ps.sp_enabled and not ps.ep_enabled:
        results.append(gathered_after_forward(model, global_batch(0, config.vocab_size)[share]))
    if ps.global_rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)


def merge(micro_batches: list[dict]) -> dict:
    """Packed micro-batches concatenated into one (their documents side by side)."""
    if len(micro_batches) == 1:
        return micro_batches[0]
    lengths = [n for mb in micro_batches for n in torch.diff(mb["cu_seqlens"]).tolist()]
    return {
        "input_ids": torch.cat([mb["input_ids"] for mb in micro_batches], dim=1),
        "labels": torch.cat([mb["labels"] for mb in micro_batches], dim=1),
        "position_ids": torch.cat([mb["position_ids"] for mb in micro_batches], dim=1),
        "cu_seqlens": torch.tensor([0, *lengths]).cumsum(0).to(torch.int32),
        "max_seqlen": max(lengths),
        "num_label_tokens": sum(mb["num_label_tokens"] for mb in micro_batches),
    }


def gathered_after_forward(model, micro_batch: dict) -> dict:
    """Which parameters FSDP2 left gathered (plain tensors) after a forward: the root's must be, because the
    fused loss reads lm_head.weight in its backward; ZeRO-3 layers must not be."""
    micro_batch = {k: v for k, v in micro_batch.items() if k != "num_label_tokens"}
    model(**micro_batch).loss.backward()  # completes the step so FSDP's state is clean again
    model.zero_grad(set_to_none=True)
    output = model(**micro_batch)
    state = {
        "root_gathered": not isinstance(model.lm_head.weight, DTensor),
        "layer_gathered": not isinstance(model.model.layers[0].self_attn.q_proj.weight, DTensor),
    }
    output.loss.backward()
    return state


if __name__ == "__main__":
    code = 0
    try:
        main()
    except Exception:
        import traceback

        traceback.print_exc()
        code = 1
    exit_process(code)
