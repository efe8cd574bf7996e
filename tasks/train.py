"""Train a dense or MoE language model.

    torchrun --nproc_per_node=N tasks/train.py configs/moe.yaml [--train.lr 1e-4 ...]

The VeOmni layers in order: arguments -> parallel state -> data -> model -> parallelize -> optimizer -> loop.
Each step takes a list of micro-batches, learns the global label-token count with one all-reduce, and
accumulates gradients of ``sum(token losses) / global count``; gradients are clipped over the right groups,
non-finite steps are skipped, and metrics go to ``<output_dir>/metrics.jsonl``.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.distributed as dist

from veofast.checkpoint import (
    check_checkpoint,
    find_latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    move_aside_checkpoints,
    save_checkpoint,
)
from veofast.data import build_data_transform, build_dataloader, build_iterative_dataset, build_mapping_dataset
from veofast.distributed.parallel_state import get_parallel_state, init_parallel_state
from veofast.distributed.sequence_parallel import shard_micro_batch
from veofast.distributed.torch_parallelize import build_parallelize_model
from veofast.models import build_config, build_foundation_model, build_tokenizer
from veofast.optim import build_lr_scheduler, build_optimizer
from veofast.train_step import to_device, train_step
from veofast.utils.arguments import (
    ArgumentError,
    DataArguments,
    ModelArguments,
    TrainingArguments,
    parse_args,
    save_args,
    to_dict,
)
from veofast.utils.flops import peak_tflops
from veofast.utils.helper import create_profiler, exit_process, set_seed
from veofast.utils.logging import get_logger, setup_logging
from veofast.utils.metrics import MetricsWriter, check_logging_backends

setup_logging()
logger = get_logger("veofast.train")


@dataclass
class Arguments:
    model: ModelArguments = field(default_factory=ModelArguments)
    data: DataArguments = field(default_factory=DataArguments)
    train: TrainingArguments = field(default_factory=TrainingArguments)


def build_dataset(args: Arguments, path: str, transform):
    if args.data.datasets_type == "iterable":
        return build_iterative_dataset(path, transform=transform, seed=args.train.seed,
                                       on_bad_record=args.data.on_bad_record)
    return build_mapping_dataset(path, transform=transform, on_bad_record=args.data.on_bad_record)


def build_loader(args: Arguments, dataset, train_steps: int | None):
    """The training loader (``train_steps`` per epoch), or with ``train_steps=None`` an evaluation loader, whose
    micro-batches have the full token budget from the first (no batch-size warm-up)."""
    return build_dataloader(
        dataset=dataset,
        micro_batch_size=args.train.micro_batch_size,
        global_batch_size=args.train.global_batch_size,
        dataloader_batch_size=args.train.dataloader_batch_size,
        seed=args.train.seed,
        max_seq_len=args.data.max_seq_len,
        train_steps=train_steps,
        rmpad=args.train.rmpad,
        rmpad_with_pos_ids=args.train.rmpad_with_pos_ids,
        bsz_warmup_ratio=args.train.bsz_warmup_ratio if train_steps is not None else 0.0,
        bsz_warmup_init_mbtoken=args.train.bsz_warmup_init_mbtoken,
        dyn_bsz_margin=args.train.dyn_bsz_margin,
        dyn_bsz_buffer_size=args.train.dyn_bsz_buffer_size,
        num_workers=args.data.num_workers,
        drop_last=args.data.drop_last,
        pin_memory=args.data.pin_memory,
        prefetch_factor=args.data.prefetch_factor,
    )


def check_output_dir(args: Arguments) -> None:
    """Refuse an output_dir that cannot be written, or one that holds another run's checkpoints unless resuming or
    asked to overwrite. Nothing is created here."""
    check_writable_dir(args.train.output_dir)
    if args.train.load_path is None and not args.train.overwrite_output_dir and list_checkpoints(args.train.output_dir):
        raise ArgumentError(
            f"train.output_dir {args.train.output_dir!r} already holds checkpoints of another run; resume with "
            "--train.load_path auto, choose another output_dir, or pass --train.overwrite_output_dir true"
        )


# init_parallel_state's arguments and the settings they come from
PARALLEL_KEYS = {
    "dp_size": "train.data_parallel_size", "ep_size": "train.expert_parallel_size",
    "ulysses_size": "train.ulysses_parallel_size", "tp_size": "train.tensor_parallel_size",
    "pp_size": "train.pipeline_parallel_size", "cp_size": "train.context_parallel_size",
}


def check_writable_dir(output_dir: str) -> None:
    """``ArgumentError`` unless ``output_dir`` is a writable directory or could be created as one: its nearest
    existing ancestor must be a writable directory."""
    existing = os.path.abspath(output_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    problem = None
    if not os.path.isdir(existing):
        problem = "is not a directory"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = "is not writable"
    if problem is not None:
        raise ArgumentError(f"train.output_dir {output_dir!r} cannot be written: {existing!r} {problem}; choose "
                            "another --train.output_dir")


def resolve_load_path(args: Arguments) -> str | None:
    """The checkpoint to resume from, or None to start from scratch, checked before anything is built.

    ``auto`` is the newest complete checkpoint in ``train.output_dir`` (none: start from scratch); a path must be a
    complete checkpoint. Either must have been saved at this run's world size; an ``ArgumentError`` says why not.
    """
    load_path = args.train.load_path
    if load_path == "auto":
        load_path = find_latest_checkpoint(args.train.output_dir)
        if load_path is None:
            logger.info_rank0("load_path auto: no checkpoint in %s, starting from scratch", args.train.output_dir)
            return None
    try:
        check_checkpoint(load_path, world_size=args.train.world_size)
    except (FileNotFoundError, ValueError) as exc:
        hint = ""
        if os.path.isdir(os.path.join(load_path, "checkpoints")):
            hint = (f"; it looks like a run's output_dir: resume that run with --train.output_dir {load_path} "
                    f"--train.load_path auto, or name one of its checkpoints "
                    f"({os.path.join(load_path, 'checkpoints', 'global_step_N')})")
        raise ArgumentError(f"train.load_path: {exc}{hint}") from exc
    return load_path


def total_train_steps(train: TrainingArguments) -> int:
    """The run's steps: num_train_epochs epochs of train_steps, or fewer by max_steps; a max_steps that the epochs
    end before is said, not cut in silence."""
    epochs = train.train_steps * train.num_train_epochs
    if train.max_steps is not None and train.max_steps > epochs:
        logger.warning_rank0("train.max_steps %d is beyond train.num_train_epochs %d x %d steps per epoch: the run "
                             "stops after %d steps (raise train.num_train_epochs or train.train_steps to go on)",
                             train.max_steps, train.num_train_epochs, train.train_steps, epochs)
    return epochs if train.max_steps is None else min(epochs, train.max_steps)


def check_model_args(model: ModelArguments) -> None:
    """``ArgumentError`` when there is no tokenizer or no model config to build (each failed later, in a
    traceback)."""
    if not model.tokenizer_path:
        raise ArgumentError("model.tokenizer_path is required: set it (or model.model_path, its default) in the "
                            "config or pass --model.tokenizer_path DIR")
    if not (model.config_path or model.config_overrides):
        raise ArgumentError("the model has no config: set model.config_path, model.model_path or "
                            "model.config_overrides (with its model_type)")


def check_vocab(tokenizer, vocab_size: int, tokenizer_path: str) -> None:
    """``ArgumentError`` when the tokenizer has ids the model's embedding lacks (they would fail inside the
    embedding lookup, on a GPU as a bare device-side assertion)."""
    if len(tokenizer) > vocab_size:
        raise ArgumentError(
            f"model.tokenizer_path {tokenizer_path!r} has {len(tokenizer)} tokens but the model's vocab_size is "
            f"{vocab_size}: token ids >= {vocab_size} have no embedding; use the model's own tokenizer, or set "
            f"model.config_overrides.vocab_size to at least {len(tokenizer)} (a model trained from scratch)"
        )


@torch.no_grad()
def evaluate(model, make_loader, device, group, num_steps: int) -> float:
    """Mean token loss over the first ``num_steps`` loader steps of the evaluation set (the same batches at every
    evaluation: the loader is built afresh from its seed)."""
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    ps = get_parallel_state()
    data_iterator = iter(make_loader())
    for _ in range(num_steps):
        for micro_batch in next(data_iterator):
            if ps.sp_enabled:  # this rank's slice of the sequence, as in training
                micro_batch = shard_micro_batch(micro_batch, ps.sp_rank, ps.sp_size)
            batch = to_device(micro_batch, device)
            count = batch["num_label_tokens"]
            out = model(**batch, num_items_in_batch=1)  # loss = sum over label tokens
            totals += torch.stack([out.lm_loss.double(), torch.tensor(float(count), device=device).double()])
    dist.all_reduce(totals, group=group)  # over data and sequence parallel ranks: each counted its own slice
    model.train()
    return (totals[0] / totals[1].clamp(min=1)).item()


def start_profiler(train: TrainingArguments, first_step: int, last_step: int):
    """The started profiler of steps [profile_start_step, profile_end_step), or None, with a warning, when none of
    them is among this run's steps ``first_step..last_step`` (a resumed run starts after its checkpoint's step)."""
    if train.profile_start_step > last_step or train.profile_end_step <= first_step:
        logger.warning("profiling: steps [%d, %d) are not among this run's steps %d..%d: no trace is written (set "
                       "train.profile_start_step and train.profile_end_step within them)", train.profile_start_step,
                       train.profile_end_step, first_step, last_step)
        return None
    profiler = create_profiler(
        start_step=train.profile_start_step, end_step=train.profile_end_step, trace_dir=train.profile_trace_dir,
        record_shapes=train.profile_record_shapes, profile_memory=train.profile_profile_memory,
        with_stack=train.profile_with_stack, first_step=first_step,
    )
    profiler.start()
    return profiler


def check_evaluation_args(args: Arguments) -> None:
    """Evaluation runs when both data.eval_path and train.eval_steps > 0 are set; one without the other is an error
    (a validation set that would never be read, or evaluations with no data)."""
    if bool(args.data.eval_path) != (args.train.eval_steps > 0):
        if args.data.eval_path:
            remedy = "pass --train.eval_steps N to evaluate every N steps, or --data.eval_path null"
        else:
            remedy = "pass --data.eval_path FILE to evaluate on it, or --train.eval_steps 0"
        raise ArgumentError(
            f"evaluation needs both data.eval_path and train.eval_steps > 0 (got data.eval_path="
            f"{args.data.eval_path!r}, train.eval_steps={args.train.eval_steps}): {remedy} to train without evaluation"
        )


def main() -> None:
    args = parse_args(Arguments)
    train = args.train
    check_evaluation_args(args)
    try:  # before any work: rank 0 would fail only once the model is built
        check_logging_backends(use_tensorboard=train.use_tensorboard, use_wandb=train.use_wandb)
    except ValueError as exc:
        raise ArgumentError(str(exc)) from exc
    if not args.data.train_path:
        raise ArgumentError("data.train_path is required: set it in the config or pass --data.train_path PATH")
    check_model_args(args.model)
    check_output_dir(args)
    tokenizer = build_tokenizer(args.model.tokenizer_path, trust_remote_code=args.model.trust_remote_code)
    model_config = build_config(args.model.config_path or args.model.model_path,
                                config_overrides=args.model.config_overrides, ops_backend=args.model.ops_backend)
    check_vocab(tokenizer, model_config.vocab_size, args.model.tokenizer_path)
    load_path = resolve_load_path(args) if train.load_path else None
    try:
        init_parallel_state(
            dp_size=train.data_parallel_size, tp_size=train.tensor_parallel_size, ep_size=train.expert_parallel_size,
            pp_size=train.pipeline_parallel_size, cp_size=train.context_parallel_size,
            ulysses_size=train.ulysses_parallel_size, dp_mode=train.data_parallel_mode,
        )
    except (ValueError, NotImplementedError) as exc:  # name the settings, not init_parallel_state's arguments
        named = [f"{arg} is {key}" for arg, key in PARALLEL_KEYS.items() if arg in str(exc)]
        processes = f"{train.world_size} process" + ("es" if train.world_size != 1 else "")
        raise ArgumentError(f"the parallel layout does not fit this run of {processes}: {exc} "
                            f"({'; '.join(named)}): change those settings or the number of processes") from exc
    ps = get_parallel_state()
    set_seed(train.seed, deterministic=train.deterministic)
    if ps.is_main_process:
        save_args(args, train.output_dir)
        # every rank is past its look at the checkpoints (init_parallel_state waited for all of them)
        kept = move_aside_checkpoints(train.output_dir) if load_path is None else None
        if kept is not None:
            logger.warning("starting anew in %s: kept the checkpoints already there as %s", train.output_dir, kept)
    logger.info_rank0("parallel state: world %d, dp %d, sp %d, ep %d on %s", ps.world_size, ps.dp_size,
                      ps.sp_size, ps.ep_size, ps.device_type)

    # ---- data
    transform = build_data_transform(
        args.data.data_type, tokenizer=tokenizer, max_seq_len=args.data.max_seq_len, text_keys=args.data.text_keys,
        chat_template=args.data.chat_template,
    )
    train_dataset = build_dataset(args, args.data.train_path, transform)
    dataset_length = len(train_dataset) if args.data.datasets_type == "mapping" else None
    train.compute_train_steps(args.data.max_seq_len, args.data.train_size, dataset_length)
    total_steps = total_train_steps(train)
    train_loader = build_loader(args, train_dataset, train.train_steps)
    make_eval_loader = None
    if args.data.eval_path:
        eval_dataset = build_dataset(args, args.data.eval_path, transform)
        make_eval_loader = partial(build_loader, args, eval_dataset, None)

    # ---- model, parallelism, optimizer
    model = build_foundation_model(
        config_path=args.model.config_path, weights_path=args.model.model_path, init_device=train.init_device,
        config_overrides=args.model.config_overrides, ops_backend=args.model.ops_backend, seed=train.seed,
    )
    config = model.config
    model = build_parallelize_model(
        model, enable_full_shard=train.enable_full_shard, enable_mixed_precision=train.enable_mixed_precision,
        enable_gradient_checkpointing=train.enable_gradient_checkpointing, init_device=train.init_device,
        enable_fsdp_offload=train.enable_fsdp_offload, basic_modules=args.model.basic_modules,
        enable_compile=train.compile, global_load_balancing=train.global_load_balancing,
        ulysses_transport=train.ulysses_transport, ulysses_head_chunks=train.ulysses_head_chunks, seed=train.seed,
    )
    optimizer = build_optimizer(
        model, lr=train.lr, weight_decay=train.weight_decay, betas=(train.adam_beta1, train.adam_beta2),
        eps=train.adam_eps,
    )
    lr_scheduler = build_lr_scheduler(
        optimizer, train_steps=total_steps, lr=train.lr, lr_min=train.lr_min, lr_warmup_ratio=train.lr_warmup_ratio,
        lr_decay_style=train.lr_decay_style, lr_decay_ratio=train.lr_decay_ratio, lr_start=train.lr_start,
    )
    num_params = sum(p.numel() for p in model.parameters())
    logger.info_rank0("model: %s, %.2fM parameters, %d steps", config.model_type, num_params / 1e6, total_steps)

    def export_hf_weights(path: str) -> None:
        from veofast.models.hf_io import save_hf_weights

        save_hf_weights(model, os.path.join(path, "hf"), tokenizer=tokenizer)

    # ---- resume
    global_step = 0
    if load_path:
        extra = load_checkpoint(load_path, model, optimizer)
        lr_scheduler.load_state_dict(extra["lr_scheduler"])
        try:
            train_loader.load_state_dict(extra["dataloader"])
        except ValueError as exc:
            raise ArgumentError(
                f"train.load_path {load_path!r}: the data position it saved does not fit this run ({exc}); resume "
                "with the data, batch and parallel settings of the run that saved it (data.*, train.micro_batch_size, "
                "train.global_batch_size, train.seed, train.ulysses_parallel_size, train.dyn_bsz_*, "
                "train.bsz_warmup_*; see that run's config.yaml), or start a new run"
            ) from exc
        global_step = extra["global_step"]
        logger.info_rank0("resumed from %s at step %d", load_path, global_step)
        if train.save_hf_weights and train.load_path == "auto" and not os.path.isdir(os.path.join(load_path, "hf")):
            # this run's checkpoint lacks its HF export (the run died while writing it, say at the last step)
            logger.info_rank0("writing the HF weights that %s lacks", load_path)
            export_hf_weights(load_path)

    metrics = MetricsWriter(
        train.output_dir, enabled=ps.is_main_process, resume=load_path is not None,
        use_tensorboard=train.use_tensorboard, use_wandb=train.use_wandb, wandb_project=train.wandb_project,
        wandb_name=train.wandb_name,
        config=to_dict(args),
    )
    profiler = None
    if train.enable_profiling and ps.is_main_process:
        profiler = start_profiler(train, first_step=global_step + 1, last_step=total_steps)

    def save(step: int) -> None:
        extra = {"global_step": step, "lr_scheduler": lr_scheduler.state_dict(),
                 "dataloader": train_loader.state_dict()}
        path = save_checkpoint(train.output_dir, step, model, optimizer, extra, keep=train.keep_checkpoints)
        if train.save_hf_weights:
            export_hf_weights(path)
        logger.info_rank0("saved checkpoint %s", path)

    # ---- the loop
    device, group = ps.device, ps.fsdp_group
    peak = peak_tflops()
    bad_steps = 0
    progress = None
    if ps.is_main_process:
        from tqdm import tqdm

        progress = tqdm(total=total_steps, initial=global_step, desc="train", dynamic_ncols=True)
    model.train()
    start_step = global_step
    start_epoch = global_step // train.train_steps
    data_iterator = iter(train_loader)
    for epoch in range(start_epoch, train.num_train_epochs):  # the loader is endless: an epoch is train_steps steps
        for _ in range(global_step % train.train_steps if epoch == start_epoch else 0, train.train_steps):
            if global_step >= total_steps:
                break
            step_start = time.perf_counter()
            lr = lr_scheduler.get_last_lr()[0]  # the lr this step applies (the scheduler moves on after it)
            result = train_step(model, next(data_iterator), optimizer, lr_scheduler, config=config, ps=ps,
                                max_grad_norm=train.max_grad_norm)
            global_step += 1
            if result.skipped:
                bad_steps += 1
                logger.warning_rank0("step %d: non-finite loss %s / grad norm %s, update skipped (%d in a row)",
                                     global_step, result.loss, result.grad_norm, bad_steps)
            else:
                bad_steps = 0
            step_time = time.perf_counter() - step_start
            record = {
                "step": global_step, "epoch": epoch, "loss": result.loss, "grad_norm": result.grad_norm,
                "lr": lr, "tokens": result.tokens,
                "tokens_per_sec": result.tokens / step_time,
                "tokens_per_sec_per_gpu": result.tokens / step_time / ps.world_size,
                "step_time": step_time, "skipped": result.skipped,
            }
            if result.aux_loss is not None:
                record["aux_loss"] = result.aux_loss
            if peak is not None:
                record["mfu"] = result.flops / step_time / ps.world_size / (peak * 1e12)
            if torch.cuda.is_available():
                record["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
            if make_eval_loader is not None and global_step % train.eval_steps == 0:
                record["eval_loss"] = evaluate(model, make_eval_loader, device, group, train.eval_batches)
            if global_step % train.log_steps == 0 or global_step == total_steps or "eval_loss" in record:
                metrics.write(record)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{result.loss:.4f}", gnorm=f"{result.grad_norm:.2f}")
            if profiler is not None:
                profiler.step()
                if global_step == train.profile_end_step:
                    profiler.stop()
                    profiler = None
            if bad_steps >= train.max_bad_steps:
                raise RuntimeError(f"{bad_steps} non-finite steps in a row (last at step {global_step}, "
                                   f"train.max_bad_steps {train.max_bad_steps}); stopping: lower train.lr, check the "
                                   "data, or resume from an earlier checkpoint")
            if train.save_steps > 0 and global_step % train.save_steps == 0 and global_step < total_steps:
                save(global_step)
        if global_step >= total_steps:
            break
    if profiler is not None:
        profiler.stop()
    if global_step > start_step:
        save(global_step)
    else:  # a finished run resumed: its checkpoint is left as it is
        logger.warning_rank0("nothing to train: resumed at step %d and this run stops at step %d (raise "
                             "train.max_steps or train.num_train_epochs to train further)", global_step, total_steps)
    if progress is not None:
        progress.close()
    metrics.close()
    logger.info_rank0("training done: %d steps, output in %s", global_step, train.output_dir)


if __name__ == "__main__":
    code = 0
    try:
        main()
    except ArgumentError as exc:  # a setting to change, which the message names: a traceback would bury it
        print(f"tasks/train.py: error: {exc}", file=sys.stderr, flush=True)
        code = 2
    except Exception:
        import traceback

        traceback.print_exc()
        code = 1
    exit_process(code)
