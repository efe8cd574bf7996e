"""Hugging Face safetensors checkpoints in and out of veofast models, plain or sharded with FSDP2/DTensor.

``load_hf_weights`` reads a ``model.safetensors`` file or a sharded checkpoint (``model.safetensors.index.json``)
into a model whose parameters are plain tensors or DTensors: each rank reads, through safetensors slices, only
the part of each tensor its local shard holds (and only the experts it owns). Every mismatch between the
checkpoint and the model is reported at once in one ``ValueError``: a model given ``weights_path`` never trains
from random weights by accident.

Dtypes: the checkpoint's dtype (``dtype`` / ``torch_dtype`` in its config.json, and the tensors' own) does not choose
the model's. ``build_foundation_model`` makes parameters of torch's default dtype (fp32): the master weights that
training keeps (bf16 compute comes from the mixed-precision policy); loading casts bf16 / fp16 values to them exactly.

``save_hf_weights`` writes the standard HF layout (per-expert expert weights, shards of at most
``max_shard_size`` with an index, ``config.json``, ``generation_config.json`` when the source checkpoint has one,
optional tokenizer files) that any transformers version loads. It saves the parameters' dtype (fp32: twice the
bytes of a bf16 source) unless given ``dtype=torch.bfloat16``, and ``config.json`` names the dtype saved.
Parameters are gathered one at a time; only rank 0 holds full tensors, on the host, and writes.

Only safetensors are read: pickled checkpoints (``pytorch_model.bin``) are refused, never unpickled.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from .hf_keys import Block, is_ignored_key, param_blocks

logger = logging.getLogger(__name__)

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
GENERATION_CONFIG_NAME = "generation_config.json"
_PICKLED_WEIGHTS = re.compile(r"\.(bin|pt|pth|ckpt)$")
_SHARD_FILE = re.compile(r"^model-\d+-of-\d+\.safetensors$")
_MAX_LISTED = 50
_FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})  # safetensors' names of the dtypes load_hf_weights casts
_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


# ------------------------------------------------------------------------------------------------ common helpers


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP and ``torch.compile`` wrappers (whose state-dict names carry a prefix)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _named_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor, list[str]]]:
    """``(name, tensor, aliases)`` for every state-dict tensor once; tied tensors list their other names."""
    model = _unwrap(model)
    seen: dict[int, int] = {}
    out: list[tuple[str, torch.Tensor, list[str]]] = []
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            out[seen[id(tensor)]][2].append(name)
            continue
        seen[id(tensor)] = len(out)
        out.append((name, tensor, []))
    return out


def _local_box(tensor: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(global offset, local shape)`` of the part of ``tensor`` this rank holds (all of it unless a DTensor)."""
    if isinstance(tensor, DTensor):
        if any(p.is_partial() for p in tensor.placements):
            raise ValueError(f"cannot load into a DTensor with Partial placements {tensor.placements}")
        shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
        return tuple(offset), tuple(shape)
    return (0,) * tensor.dim(), tuple(tensor.shape)


def _listing(title: str, items: list[str]) -> str:
    shown = items[:_MAX_LISTED]
    more = f"\n    ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
    return f"  {title} ({len(items)}):\n" + "\n".join(f"    {item}" for item in shown) + more


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


# ------------------------------------------------------------------------------------------------------- loading


def checkpoint_files(weights_path: str) -> list[str]:
    """The safetensors files of the checkpoint in directory ``weights_path``: ``model.safetensors`` when there is
    one, else the files that ``model.safetensors.index.json`` names (all of them, ``model.safetensors`` too, when the
    index names it).

    The single file wins as in transformers' ``from_pretrained``: ``save_pretrained`` into a directory that held a
    sharded save deletes the old shards but leaves their index behind."""
    if not os.path.isdir(weights_path):
        raise FileNotFoundError(f"load_hf_weights: weights_path {weights_path!r} is not a directory")
    single = os.path.join(weights_path, SAFE_WEIGHTS_NAME)
    index_path = os.path.join(weights_path, SAFE_WEIGHTS_INDEX_NAME)
    if os.path.isfile(index_path):
        with open(index_path) as f:
            try:
                weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(f"load_hf_weights: {index_path} is not a valid safetensors index: {exc!r}") from exc
        files = sorted(set(weight_map.values()))
        if SAFE_WEIGHTS_NAME in files or not os.path.isfile(single):
            for name in files:
                if os.path.basename(name) != name or not name.endswith(".safetensors"):
                    raise ValueError(
                        f"load_hf_weights: {index_path} names {name!r}, not a .safetensors file in the directory"
                    )
                if not os.path.isfile(os.path.join(weights_path, name)):
                    raise FileNotFoundError(f"load_hf_weights: {index_path} names {name!r}, which is missing")
            return [os.path.join(weights_path, name) for name in files]
    if os.path.isfile(single):
        return [single]
    present = sorted(os.listdir(weights_path))
    pickled = [name for name in present if _PICKLED_WEIGHTS.search(name)]
    if pickled:
        raise ValueError(
            f"load_hf_weights: {weights_path!r} holds only pickled weights ({', '.join(pickled)}); veofast reads "
            "safetensors only (pickles can run code). Convert them, e.g. load with transformers and "
            "save_pretrained(..., safe_serialization=True)"
        )
    raise FileNotFoundError(
        f"load_hf_weights: {weights_path!r} has neither {SAFE_WEIGHTS_NAME} nor {SAFE_WEIGHTS_INDEX_NAME} "
        f"(it holds: {', '.join(present) or 'nothing'})"
    )


def _overlap(
    offset: tuple[int, ...], shape: tuple[int, ...], block: Block
) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """``(lo, hi)`` of the box ``[offset, offset + shape)`` intersected with ``block``'s box, or None if empty."""
    lo = tuple(max(a, b) for a, b in zip(offset, block.offset, strict=True))
    hi = tuple(min(a + s, b + t) for a, s, b, t in zip(offset, shape, block.offset, block.shape, strict=True))
    if any(start >= stop for start, stop in zip(lo, hi, strict=True)):
        return None
    return lo, hi


def _slices(lo: tuple[int, ...], hi: tuple[int, ...], origin: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, origin, strict=True))


def _read_block(handle, block: Block, lo: tuple[int, ...], hi: tuple[int, ...]) -> torch.Tensor:
    """The part ``[lo, hi)`` (parameter coordinates, inside the block) of the block's disk tensor."""
    box = tuple(b - a for a, b in zip(lo, hi, strict=True))
    if not block.disk_shape:
        return handle.get_tensor(block.key).reshape(box)
    dropped = len(block.shape) - len(block.disk_shape)
    index = _slices(lo[dropped:], hi[dropped:], block.offset[dropped:])
    return handle.get_slice(block.key)[index].reshape(box)


class _DiskTensor(NamedTuple):
    file: str
    shape: tuple[int, ...]
    dtype: str  # safetensors' name: "BF16", "F32", "I8", ...


@torch.no_grad()
def load_hf_weights(model: nn.Module, weights_path: str) -> None:
    """Fill every parameter and persistent buffer of ``model`` from the HF safetensors checkpoint in ``weights_path``.

    ``model`` may be plain or hold DTensors (FSDP2, expert parallel, any mesh): each rank reads only the slice
    of each tensor it holds. Values (F16, BF16, F32 or F64 on disk) are cast to the parameters' dtype and copied to
    their device. A tied ``lm_head.weight`` may be absent from the checkpoint. Missing keys, unexpected keys, shape
    mismatches, other dtypes (integer or float8: a quantized checkpoint) and keys stored in two files raise one
    ``ValueError`` that lists them all (the model is left untouched then). A checkpoint that holds both tied tensors
    with different values (transformers unties them then) raises a ``ValueError`` after loading.
    """
    files = checkpoint_files(weights_path)
    disk: dict[str, _DiskTensor] = {}
    duplicates: list[str] = []
    for path in files:
        with safe_open(path, framework="pt", device="cpu") as handle:
            for key in handle.keys():
                info = handle.get_slice(key)
                if key in disk:
                    duplicates.append(f"{key}: in {os.path.basename(disk[key].file)} and {os.path.basename(path)}")
                disk[key] = _DiskTensor(path, tuple(info.get_shape()), info.get_dtype())

    plan = _match_checkpoint(model, disk, duplicates, weights_path)
    reads: dict[str, list[tuple[torch.Tensor, Block, tuple, tuple[int, ...]]]] = {path: [] for path in files}
    twin_reads: dict[str, list[tuple[torch.Tensor, Block, tuple, tuple[int, ...]]]] = {path: [] for path in files}
    for name, tensor, blocks, twins in plan:
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        if local.is_meta:
            raise ValueError(f"load_hf_weights: {name} is on the meta device; materialise the model first")
        offset, shape = _local_box(tensor)
        assert tuple(local.shape) == shape, (name, tuple(local.shape), shape)
        for group, target in ((blocks, reads), (twins, twin_reads)):
            for block in group:
                overlap = _overlap(offset, shape, block) if local.numel() else None
                if overlap is not None:
                    target[disk[block.key].file].append((local, block, overlap, offset))
    for path, items in reads.items():  # one file mapped at a time: its pages leave the resident set when closed
        if not items:
            continue
        with safe_open(path, framework="pt", device="cpu") as handle:
            for local, block, (lo, hi), offset in items:
                local[_slices(lo, hi, offset)].copy_(_read_block(handle, block, lo, hi))
    if any(twins for *_, twins in plan):  # the same on every rank
        _check_tied_copies(twin_reads, weights_path)


def _check_tied_copies(twin_reads: dict, weights_path: str) -> None:
    """Raise (on every rank) when a second stored copy of a tied tensor differs from the loaded one."""
    differing = []
    for path, items in twin_reads.items():
        if not items:
            continue
        with safe_open(path, framework="pt", device="cpu") as handle:
            for local, block, (lo, hi), offset in items:
                if not torch.equal(local[_slices(lo, hi, offset)], _read_block(handle, block, lo, hi).to(local)):
                    differing.append(block.key)
    message = None
    if differing:
        message = (
            f"load_hf_weights: the checkpoint in {weights_path!r} holds {differing[0]} with other values than the "
            "tensor it is tied to (tie_word_embeddings is true), which transformers would load untied. Set "
            "tie_word_embeddings false (model.config_overrides) to train both, or remove the key from the checkpoint"
        )
    if dist.is_available() and dist.is_initialized():
        messages = [None] * dist.get_world_size()
        dist.all_gather_object(messages, message)
        message = next((m for m in messages if m), None)
    if message:
        raise ValueError(message)


def _match_checkpoint(
    model: nn.Module, disk: dict[str, _DiskTensor], duplicates: list[str], weights_path: str
) -> list[tuple[str, torch.Tensor, list[Block], list[Block]]]:
    """``(name, tensor, blocks, twins)`` for every model tensor (``twins``: further stored copies of a tied tensor,
    checked against it after loading); one ValueError listing every key that does not fit."""
    plan: list[tuple[str, torch.Tensor, list[Block], list[Block]]] = []
    used: set[str] = set()
    missing, mismatched, wrong_dtype = [], [], []
    for name, tensor, aliases in _named_tensors(model):
        stored = [key for key in (name, *aliases) if key in disk]  # a tied tensor may be stored under any of its names
        name = stored[0] if stored else name
        blocks = param_blocks(name, tuple(tensor.shape), disk.keys())
        twins = [block for key in stored[1:] for block in param_blocks(key, tuple(tensor.shape), disk.keys())]
        for block in blocks + twins:
            if block.key not in disk:
                missing.append(block.key)
            elif disk[block.key].shape != block.disk_shape:
                mismatched.append(f"{block.key}: checkpoint {disk[block.key].shape}, model {block.disk_shape}")
            elif disk[block.key].dtype not in _FLOAT_DTYPES:
                wrong_dtype.append(f"{block.key}: {disk[block.key].dtype}")
            used.add(block.key)
        plan.append((name, tensor, blocks, twins))
    unexpected = sorted(key for key in disk if key not in used and not is_ignored_key(key))
    if missing or unexpected or mismatched or wrong_dtype or duplicates:
        parts = [f"load_hf_weights: the checkpoint in {weights_path!r} does not match the model:"]
        for title, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
            ("dtypes other than F16, BF16, F32, F64 (a quantized checkpoint? dequantize it first)", wrong_dtype),
            ("keys stored in two files", duplicates),
        ):
            if items:
                parts.append(_listing(title, items))
        parts.append("Check that the config (model_type, sizes, tie_word_embeddings) belongs to these weights.")
        raise ValueError("\n".join(parts))
    return plan


# -------------------------------------------------------------------------------------------------------- saving


def parse_size(size: int | str) -> int:
    """Bytes in ``size``: an int, or a string such as ``"5GB"`` (10^9), ``"500MiB"`` (2^20 each), ``"1000"``."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    elif isinstance(size, str) and (match := re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", size)):
        unit = match[2].upper()
        if unit not in _SIZE_UNITS:
            raise ValueError(f"max_shard_size: unknown unit {match[2]!r} in {size!r}; use B, KB, MB, GB, KiB, MiB, GiB")
        value = int(float(match[1]) * _SIZE_UNITS[unit])
    else:
        raise ValueError(f"max_shard_size must be an int or a string like '5GB', got {size!r}")
    if value <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return value


def _existing_checkpoint(output_dir: str) -> list[str]:
    if not os.path.isdir(output_dir):
        return []
    names = os.listdir(output_dir)
    return sorted(n for n in names if n in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME) or _SHARD_FILE.match(n))


def _agree_on_error(message: str | None) -> None:
    """Raise ``ValueError(message)`` on every rank when rank 0 found one (so no rank waits in a collective)."""
    if dist.is_available() and dist.is_initialized():
        box = [message]
        dist.broadcast_object_list(box, src=0)
        message = box[0]
    if message:
        raise ValueError(message)


def _shard_plan(entries: list[tuple[str, torch.Tensor, list[Block]]], dtype: torch.dtype | None, limit: int):
    """Assign each disk key to a shard, greedily in order: ``(file name per key, keys per file, total bytes)``."""
    shards: list[list[str]] = [[]]
    current = total = 0
    for _, tensor, blocks in entries:
        itemsize = (dtype or tensor.dtype).itemsize
        for block in blocks:
            nbytes = block.numel * itemsize
            if shards[-1] and current + nbytes > limit:
                shards.append([])
                current = 0
            shards[-1].append(block.key)
            current += nbytes
            total += nbytes
    if len(shards) == 1:
        names = [SAFE_WEIGHTS_NAME]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    keys_of = dict(zip(names, shards, strict=True))
    file_of = {key: name for name, keys in keys_of.items() for key in keys}
    return file_of, keys_of, total


def _full_tensors(entries, dtype: torch.dtype | None, write: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """``(disk key, CPU tensor)`` in plan order, one parameter gathered at a time (tensors only where ``write``)."""
    for _, tensor, blocks in entries:
        full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        if not write:
            continue
        full = full.detach().to("cpu", dtype or full.dtype)
        for block in blocks:
            box = tuple(slice(o, o + s) for o, s in zip(block.offset, block.shape, strict=True))
            yield block.key, full[box].reshape(block.disk_shape).clone()


def _source_generation_config(model: nn.Module) -> str | None:
    """The ``generation_config.json`` of the checkpoint the model was built from (its ``weights_path``, else the
    directory of its config), or None. It holds what ``generate()`` needs beyond config.json (e.g. the chat models'
    extra end-of-turn ids, their sampling defaults); transformers' ``save_pretrained`` carries it along the same way."""
    model = _unwrap(model)
    for source in (getattr(model, "weights_path", None), getattr(model, "config_source", None)):
        if not isinstance(source, str):
            continue
        directory = source if os.path.isdir(source) else os.path.dirname(source)
        path = os.path.join(directory, GENERATION_CONFIG_NAME)
        if os.path.isfile(path):
            return path
    return None


def _hf_config(model: nn.Module, dtype: torch.dtype) -> dict:
    config = getattr(_unwrap(model), "config", None)
    if config is None or not hasattr(config, "to_hf_dict"):
        raise ValueError(
            "save_hf_weights: model has no veofast config (model.config.to_hf_dict) to write as config.json"
        )
    hf = config.to_hf_dict()
    hf["dtype"] = str(dtype).removeprefix("torch.")
    if "torch_dtype" in hf:
        hf["torch_dtype"] = hf["dtype"]
    return hf


def _temporary_prefix(output_dir: str) -> str:
    """Where an export to ``output_dir`` is written before it is moved into place: ``<parent>/.<name>.tmp-``
    followed by a random id."""
    return os.path.join(os.path.dirname(output_dir), f".{os.path.basename(output_dir)}.tmp-")


def _remove_unfinished_exports(output_dir: str) -> None:
    """Delete the temporary directories that exports to ``output_dir`` killed before their end left (each a copy of
    the weights that nothing reads)."""
    prefix = _temporary_prefix(output_dir)
    for path in glob.glob(glob.escape(prefix) + "*"):
        if re.fullmatch(r"[0-9a-f]{8}", path[len(prefix) :]) and os.path.isdir(path) and not os.path.islink(path):
            logger.info("save_hf_weights: removing %s, left by an export that did not finish", path)
            shutil.rmtree(path)


@torch.no_grad()
def save_hf_weights(
    model: nn.Module,
    output_dir: str,
    *,
    max_shard_size: int | str = "5GB",
    tokenizer=None,
    dtype: torch.dtype | None = None,
) -> None:
    """Write ``model`` as an HF checkpoint: safetensors (+ index when sharded), ``config.json``, the source
    checkpoint's ``generation_config.json`` (when the model was built from a directory that has one), tokenizer files.

    Call on every rank: DTensor parameters are gathered one at a time (``full_tensor``); rank 0 moves each to
    the host, cuts it into HF tensors (experts one by one) and writes a shard file whenever a shard of up to
    ``max_shard_size`` bytes is complete. ``dtype`` casts the saved weights (default: the parameters' dtype, fp32
    for a model ``build_foundation_model`` made, even from a bf16 checkpoint); config.json records the dtype saved.
    Files are written to a temporary directory next to ``output_dir`` and moved into place at the end;
    ``output_dir`` must not already hold a safetensors checkpoint (ValueError).
    """
    limit = parse_size(max_shard_size)
    entries = [(name, tensor, param_blocks(name, tuple(tensor.shape))) for name, tensor, _ in _named_tensors(model)]
    if not entries:
        raise ValueError("save_hf_weights: the model has no parameters")
    file_of, keys_of, total = _shard_plan(entries, dtype, limit)
    write = _rank() == 0
    output_dir = os.path.abspath(output_dir)
    error = None
    if write:
        if os.path.exists(output_dir) and not os.path.isdir(output_dir):
            error = f"save_hf_weights: output_dir {output_dir!r} exists and is not a directory"
        elif existing := _existing_checkpoint(output_dir):
            error = (
                f"save_hf_weights: {output_dir!r} already holds a checkpoint ({', '.join(existing)}); "
                "choose another output_dir or remove those files"
            )
    _agree_on_error(error)

    tmp_dir = f"{_temporary_prefix(output_dir)}{uuid.uuid4().hex[:8]}"
    try:
        if write:
            _remove_unfinished_exports(output_dir)
            os.makedirs(tmp_dir)
        buffers: dict[str, dict[str, torch.Tensor]] = {name: {} for name in keys_of}
        for key, value in _full_tensors(entries, dtype, write):
            shard = file_of[key]
            buffers[shard][key] = value
            if len(buffers[shard]) == len(keys_of[shard]):
                save_file(buffers.pop(shard), os.path.join(tmp_dir, shard), metadata={"format": "pt"})
        if write:
            if len(keys_of) > 1:
                index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(file_of.items()))}
                with open(os.path.join(tmp_dir, SAFE_WEIGHTS_INDEX_NAME), "w") as f:
                    json.dump(index, f, indent=2)
            saved_dtype = dtype or entries[0][1].dtype
            with open(os.path.join(tmp_dir, "config.json"), "w") as f:
                json.dump(_hf_config(model, saved_dtype), f, indent=2, sort_keys=True)
            generation_config = _source_generation_config(model)
            if generation_config is not None:
                shutil.copyfile(generation_config, os.path.join(tmp_dir, GENERATION_CONFIG_NAME))
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp_dir)
            _move_into_place(tmp_dir, output_dir)
    finally:
        if write and os.path.isdir(tmp_dir):
            shutil.rmtree(tmp_dir)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _move_into_place(tmp_dir: str, output_dir: str) -> None:
    """Rename ``tmp_dir`` to ``output_dir``, or move its files in (``config.json`` last) when it exists."""
    if not os.path.exists(output_dir):
        os.rename(tmp_dir, output_dir)
        return
    names = sorted(os.listdir(tmp_dir), key=lambda n: n == "config.json")
    for name in names:
        os.replace(os.path.join(tmp_dir, name), os.path.join(output_dir, name))
    os.rmdir(tmp_dir)
